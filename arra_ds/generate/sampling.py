"""Sampling settings and the per-step logit operations of image generation.

The pipeline for one step follows Lumina-mGPT's logits processors (``inference_solver.py``), in the
order Hugging Face ``generate`` applies them there (custom processors first, temperature last):

    logits [B, V] (fp32) -> classifier-free guidance -> structure mask -> top-k -> temperature -> draw

- Guidance mixes the conditional and the unconditional logits as Lumina-mGPT does,
  ``uncond + g * (cond - uncond)``, written as ``cond + (g - 1) * (cond - uncond)`` so that g = 1
  returns the conditional logits bit for bit.
- Image code positions keep only image code tokens (``<racm3:break>`` .. ``<eoss>``); row ends and
  ``<eoss>`` are forced by the sampler and never drawn.
- Top-k is ``image_top_k`` inside an image and ``text_top_k`` elsewhere.
- Draws use inverse-CDF sampling with one uniform number per sample and step taken from that
  sample's own ``torch.Generator``: a sample's tokens depend on its seed only, not on the batch it
  was generated in, the number of ranks or the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import GRID_CELL_PX, is_valid_pixel_size


DEFAULT_IMAGE_SIZE = 512  # ARRA's and Lumina-mGPT's sampling size, for models whose trained size is unknown


@dataclass
class SamplingConfig:
    """Defaults are ARRA's (``inference_vision.py``: cfg 4.0, image top-k 2000, temperature 1.0) and
    Lumina-mGPT's text top-k 10. The size defaults to the size the model was trained at (its run's
    data record; generation and evaluation fill it in), else ARRA's 512 x 512."""

    guidance_scale: float = 4.0  # 1.0 disables classifier-free guidance (no unconditional branch)
    image_top_k: int = 2000
    text_top_k: int = 10
    temperature: float = 1.0  # 0 = greedy
    height: int = 0  # pixels, a multiple of 32 (one grid token each); 0 = the trained size (else 512)
    width: int = 0
    seed: int = 0  # base seed; sample k draws from seed_for_sample(seed, k)
    max_text_tokens: int = 0  # text sampled after <eoss> (text top-k, no guidance), until end of turn

    def validate(self) -> None:
        if self.guidance_scale <= 0:
            raise ConfigError(f"sampling.guidance_scale={self.guidance_scale} must be > 0 (1.0 = no guidance)")
        if self.image_top_k < 1 or self.text_top_k < 1:
            raise ConfigError(
                f"sampling.image_top_k={self.image_top_k} and sampling.text_top_k={self.text_top_k} must be >= 1"
            )
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        for key, value in (("height", self.height), ("width", self.width)):
            if value and not is_valid_pixel_size(value):
                raise ConfigError(
                    f"sampling.{key}={value} must be a positive multiple of {GRID_CELL_PX} "
                    f"(one grid token = {GRID_CELL_PX} px), e.g. 512, or 0 (the size the model was trained at)"
                )
        if self.max_text_tokens < 0:
            raise ConfigError(f"sampling.max_text_tokens={self.max_text_tokens} must be >= 0")

    def pixel_size(self) -> tuple[int, int]:
        """(height, width) in pixels; a size left at 0 is ``DEFAULT_IMAGE_SIZE``."""
        return self.height or DEFAULT_IMAGE_SIZE, self.width or DEFAULT_IMAGE_SIZE

    def with_default_size(self, height: int, width: int) -> "SamplingConfig":
        """A copy whose sizes left at 0 are ``height`` / ``width`` (e.g. the trained size)."""
        return replace(self, height=self.height or height, width=self.width or width)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

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
