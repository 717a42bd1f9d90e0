"""Sampling settings and the per-step logit operations of image generation, for every backbone.

One step (the order of Lumina-mGPT's logits processors and of LlamaGen's ``generate.py``):

    logits [B, V] (fp32) -> classifier-free guidance -> allowed tokens -> temperature -> top-k -> top-p -> draw

- Guidance mixes the conditional and the unconditional logits, ``uncond + g * (cond - uncond)``, written as
  ``cond + (g - 1) * (cond - uncond)`` so that g = 1 returns the conditional logits bit for bit.
  ``guidance_interval = n >= 0`` guides only the first n + 2 codes (LlamaGen's ``cfg_interval`` counting: the
  prefill code, then decode steps 0..n); -1 guides every code.
- Code positions keep only the tokens the backbone allows there (Chameleon: image code tokens; LlamaGen: the
  whole codebook); structure tokens (row ends, end of image) are forced by the backbone and never drawn.
- Top-k is ``image_top_k`` inside an image (0 = every code) and ``text_top_k`` for text after it; top-p (nucleus)
  as Hugging Face's ``top_k_top_p_filtering``, which LlamaGen samples with.
- Draws use inverse-CDF sampling with one uniform number per sample and step taken from that sample's own
  ``torch.Generator``: a sample's tokens depend on its seed only, not on the batch it was generated in, the
  number of ranks or the device.

Settings left at ``None`` take the backbone's defaults (``Backbone.sampling_defaults``): ARRA's cfg 4.0 and image
top-k 2000 for the Chameleon family, the paper's ARRA-Base FID setting (cfg 2.0, no top-k) for LlamaGen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from arra_ds.errors import ConfigError

NO_GUIDANCE_INTERVAL = -1  # guide every code


@dataclass
class SamplingConfig:
    # classifier-free guidance: uncond + g * (cond - uncond)
    guidance_scale: float | None = None  # 1.0 = none; None = the backbone's (Chameleon family 4.0 as ARRA, LlamaGen 2.0)
    guidance_interval: int = NO_GUIDANCE_INTERVAL  # -1: guide every code; n >= 0: only the first n + 2 codes
    image_top_k: int | None = None  # top-k over the codes; 0 = all; None = the backbone's (ARRA 2000, LlamaGen 0)
    text_top_k: int = 10  # top-k of text sampled after the image (Lumina-mGPT's)
    top_p: float = 1.0  # nucleus filter on the codes; 1.0 = none
    temperature: float = 1.0  # 0 = greedy
    height: int = 0  # pixels; 0 = the size the model was trained at (else the backbone's own)
    width: int = 0
    seed: int = 0  # base seed; sample k draws from seed_for_sample(seed, k)
    max_text_tokens: int = 0  # text sampled after the image (text top-k, no guidance), until end of turn

    def validate(self) -> None:
        if self.guidance_scale is not None and self.guidance_scale <= 0:
            raise ConfigError(f"sampling.guidance_scale={self.guidance_scale} must be > 0 (1.0 = no guidance)")
        if self.guidance_interval < NO_GUIDANCE_INTERVAL:
            raise ConfigError(f"sampling.guidance_interval={self.guidance_interval} must be >= -1 (-1 = guide every code)")
        if (self.image_top_k is not None and self.image_top_k < 0) or self.text_top_k < 1:
            raise ConfigError(
                f"sampling.image_top_k={self.image_top_k} must be >= 0 (0 = every code) and "
                f"sampling.text_top_k={self.text_top_k} >= 1"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} must be in (0, 1] (1.0 = no nucleus filter)")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.height < 0 or self.width < 0:
            raise ConfigError(f"sampling.height / width = {self.height} / {self.width} must be >= 0 (0 = the trained size)")
        if self.max_text_tokens < 0:
            raise ConfigError(f"sampling.max_text_tokens={self.max_text_tokens} must be >= 0")

    def with_defaults(self, defaults: dict) -> "SamplingConfig":
        """A copy whose ``None`` fields take ``defaults`` (a backbone's ``sampling_defaults``)."""
        missing = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return replace(self, **missing)

    def with_default_size(self, height: int, width: int) -> "SamplingConfig":
        """A copy whose sizes left at 0 are ``height`` / ``width`` (e.g. the trained size)."""
        return replace(self, height=self.height or height, width=self.width or width)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    def guides(self, code_index: int) -> bool:
        """Is code number ``code_index`` (0-based, in drawing order) drawn from guided logits?"""
        return self.uses_guidance and (
            self.guidance_interval == NO_GUIDANCE_INTERVAL or code_index <= self.guidance_interval + 1
        )

    def as_dict(self) -> dict:
        return asdict(self)


def seed_for_sample(base_seed: int, sample_index: int) -> int:
    """Seed of global sample ``sample_index``: a hash of (base seed, index), not base + index, so
    that neighbouring runs (seed 0 and seed 1) share no samples."""
    return int(np.random.SeedSequence([int(base_seed), int(sample_index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def draw_uniforms(generators: list[torch.Generator], rows: torch.Tensor | None = None) -> torch.Tensor:
    """One U[0, 1) number per generator (or per listed row); CPU float64 [n]."""
    indices = range(len(generators)) if rows is None else rows.tolist()
    return torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in indices])


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``; exactly ``cond`` for scale 1. Shapes [B, V]."""
    return cond + (scale - 1.0) * (cond - uncond)


def restrict_to(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set logits of tokens outside ``allowed`` (bool [V]) to -inf."""
    return logits.masked_fill(~allowed, float("-inf"))


def sample_top_k(logits: torch.Tensor, top_k: int, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(top-k(logits) / temperature) by inverse CDF.

    logits [B, V] float, uniforms [B] in [0, 1) -> token ids [B] int64. Tokens at -inf are never
    drawn, even when fewer than ``top_k`` tokens are finite.
    """
    k = min(top_k, logits.shape[-1])
    values, indices = logits.float().topk(k, dim=-1)  # [B, k], sorted descending
    if temperature == 0:
        return indices[:, 0]
    probs = torch.softmax(values / temperature, dim=-1)
    cdf = probs.double().cumsum(dim=-1)  # [B, k]; float64 so that u < 1 stays below the total
    # Scale u by the total so that rounding (cdf[-1] = 0.99999994) cannot push it past the last
    # token with non-zero probability; "right" skips zero-probability entries.
    targets = uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]
    picked = torch.searchsorted(cdf, targets[:, None], right=True)  # [B, 1]
    last_drawable = (probs > 0).sum(dim=-1, keepdim=True) - 1  # u = 1 exactly must not reach a -inf token
    return indices.gather(1, torch.minimum(picked, last_drawable)).squeeze(1)


def restrict_to_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens whose probabilities sum to ``top_p`` (the first token
    that crosses it included, so at least one), set the rest to -inf. logits [B, V] (-inf entries stay
    out). As Hugging Face's ``top_k_top_p_filtering``, which LlamaGen samples with; ``top_p >= 1`` keeps all."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # shift right: the token that crosses top_p stays
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_codes(
    logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [B, V] -> codes [B]: allowed tokens, temperature, top-k, top-p (on the tempered logits, as LlamaGen),
    inverse CDF; greedy (the arg max of the allowed tokens) at temperature 0. ``cfg`` is resolved (no None)."""
    if allowed is not None:
        logits = restrict_to(logits, allowed)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    tempered = logits.float() / cfg.temperature
    top_k = cfg.image_top_k or logits.shape[-1]
    if cfg.top_p < 1.0:
        values, indices = tempered.topk(min(top_k, tempered.shape[-1]), dim=-1)
        tempered = torch.full_like(tempered, float("-inf")).scatter(-1, indices, values)
        tempered = restrict_to_top_p(tempered, cfg.top_p)
    return sample_top_k(tempered, top_k, 1.0, uniforms)
