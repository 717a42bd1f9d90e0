"""Class-conditional sampling (ARRA-Base / LlamaGen): batched, KV cache, classifier-free guidance, per-sample seeds.

One step follows LlamaGen's ``autoregressive/models/generate.py``: logits [B, V] (fp32) -> guidance
``uncond + s * (cond - uncond)`` (``classifier_free_guidance``) -> temperature -> top-k -> top-p ->
draw. The unconditional rows (the null class) run in the same batch as the conditional ones and are
fed the same codes:

    rows 0..B-1     [class_b]    code_0 ... code_{T-1}
    rows B..2B-1    [null class] (the same codes)

Guidance is used when ``cfg_scale > 1`` (as upstream); ``cfg_interval = n >= 0`` guides only the first
n + 2 codes (upstream's counting: the prefill code, then decode steps 0..n), -1 guides every code.
Draws use inverse-CDF sampling with one uniform number per sample and step from that sample's own
generator (``seed_for_sample``): a sample's codes depend on its seed, not on the ranks or batch mates.

Sample k of an evaluation is class ``classes[k // samples_per_class]``, seeded with
``seed_for_sample(seed, k)`` and written to ``images/<k:06d>.png``; chunk c of ``batch_size`` samples runs
on rank c % world, and each image is decoded alone, so any number of ranks writes the same files.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import is_trainer_checkpoint, read_trained_backbone
from arra_ds.data.images import pixels_to_uint8
from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.generate.images import save_png
from arra_ds.generate.sampling import (
    classifier_free_guidance,
    draw_uniforms,
    restrict_to_top_p,
    sample_generators,
    sample_top_k,
    seed_for_sample,
)
from arra_ds.model.backbone import LLAMAGEN_SOURCE
from arra_ds.model.llamagen import LlamaGenConfig, LlamaGenGPT, load_llamagen_checkpoint
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

NO_CFG_INTERVAL = -1


@dataclass
class ClassSamplingConfig:
    """Defaults: the paper's ARRA-Base FID setting (CFG 2.0) with LlamaGen's FID sampling (sample_c2i_ddp.py:
    no top-k, no top-p, temperature 1)."""

    cfg_scale: float = 2.0  # classifier-free guidance; 1.0 = none (no unconditional rows)
    cfg_interval: int = NO_CFG_INTERVAL  # -1: guide every code; n >= 0: only the first n + 2 codes (upstream)
    top_k: int = 0  # 0 = the whole codebook
    top_p: float = 1.0  # 1.0 = no nucleus filter
    temperature: float = 1.0  # 0 = greedy
    seed: int = 0  # base seed; sample k draws from seed_for_sample(seed, k)

    def validate(self) -> None:
        if self.cfg_scale < 1.0:
            raise ConfigError(f"sampling.cfg_scale={self.cfg_scale} must be >= 1 (1.0 = no guidance; LlamaGen guides above 1)")
        if self.cfg_interval < NO_CFG_INTERVAL:
            raise ConfigError(f"sampling.cfg_interval={self.cfg_interval} must be >= -1 (-1 = guide every code)")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k} must be >= 0 (0 = no top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} must be in (0, 1] (1.0 = no nucleus filter)")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_scale > 1.0

    def guides(self, code_index: int) -> bool:
        """Is code number ``code_index`` (0-based, raster order) drawn from guided logits?"""
        return self.uses_guidance and (self.cfg_interval == NO_CFG_INTERVAL or code_index <= self.cfg_interval + 1)

    def as_dict(self) -> dict:
        return asdict(self)


def draw_codes(logits: torch.Tensor, cfg: ClassSamplingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> codes [B]: temperature, top-k, top-p (on the tempered logits, as upstream), inverse CDF."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    tempered = logits.float() / cfg.temperature
    top_k = cfg.top_k or logits.shape[-1]
    if cfg.top_p < 1.0:
        values, indices = tempered.topk(top_k, dim=-1)
        tempered = torch.full_like(tempered, float("-inf")).scatter(-1, indices, values)
        tempered = restrict_to_top_p(tempered, cfg.top_p)
    return sample_top_k(tempered, top_k, 1.0, uniforms)


class ClassSampler:
    """Draw VQ code grids for class labels from a ``LlamaGenGPT`` (eval mode, on its device)."""

    def __init__(self, model: LlamaGenGPT, cfg: ClassSamplingConfig):
        cfg.validate()
        if cfg.uses_guidance and not model.config.has_null_class:
            raise ConfigError(
                f"sampling.cfg_scale={cfg.cfg_scale} needs the null class of classifier-free guidance, which a model "
                "trained with class_dropout_prob=0 lacks; use sampling.cfg_scale=1"
            )
        self.model = model
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid_size(self) -> int:
        return self.model.config.grid_size

    @torch.inference_mode()
    def generate(self, class_ids: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """One image per label; ``seeds`` one per label (``seed_for_sample``). Returns codes [B, grid, grid] int64 (CPU)."""
        if len(class_ids) != len(seeds):
            raise ValueError(f"got {len(class_ids)} class ids but {len(seeds)} seeds")
        if not class_ids:
            raise ValueError("generate needs at least one class id")
        num_classes = self.model.config.num_classes
        if not all(0 <= c < num_classes for c in class_ids):
            raise ValueError(f"class ids must lie in [0, {num_classes}), got {sorted(set(class_ids))}")
        cfg, model, device = self.cfg, self.model, self.device
        batch = len(class_ids)
        labels = torch.tensor(list(class_ids), dtype=torch.long, device=device)
        if cfg.uses_guidance:
            labels = torch.cat([labels, torch.full_like(labels, model.null_class_id)])
        generators = sample_generators(list(seeds))
        num_codes = model.config.block_size
        codes = torch.empty((batch, num_codes), dtype=torch.long, device=device)
        logits, cache = model.prefill(labels)  # [R, V] fp32: logits for code 0
        for index in range(num_codes):
            cond = logits[:batch]
            if cfg.guides(index):
                cond = classifier_free_guidance(cond, logits[batch:], cfg.cfg_scale)
            codes[:, index] = draw_codes(cond, cfg, draw_uniforms(generators))
            if index + 1 < num_codes:
                feed = torch.cat([codes[:, index], codes[:, index]]) if cfg.uses_guidance else codes[:, index]
                logits, cache = model.decode_step(feed, cache, position=index)
        return codes.view(batch, self.grid_size, self.grid_size).cpu()


# ---- models --------------------------------------------------------------------------------------


class ClassModelLoadError(UserError, ValueError):
    """A model path that is neither a class-conditional trainer checkpoint nor an upstream LlamaGen c2i file."""


def load_class_model(
    path: str | Path, llamagen: LlamaGenConfig, dtype: torch.dtype, device: torch.device | str
) -> tuple[LlamaGenGPT, dict]:
    """(LlamaGen GPT in eval mode on ``device``, description) from a trainer checkpoint of a model.source=llamagen
    run (its own sizes; the projector dropped) or an upstream c2i file (``c2i_B_256.pt``; sizes from ``llamagen``)."""
    path = Path(path)
    if is_trainer_checkpoint(path):
        trained = read_trained_backbone(path)
        if trained.model_cfg.source != LLAMAGEN_SOURCE:
            raise ClassModelLoadError(
                f"{path} is a model.source={trained.model_cfg.source} run (text-to-image); evaluate it with launch/eval.py"
            )
        model = LlamaGenGPT(trained.model_cfg.llamagen, initialize=False)
        load_llamagen_checkpoint(model, trained.state_dict)
        description = {"kind": "trainer_checkpoint", "path": str(trained.ref.path), "step": trained.ref.step}
    elif path.is_file():
        model = LlamaGenGPT(llamagen, initialize=False)
        load_llamagen_checkpoint(model, path)
        description = {"kind": "llamagen_checkpoint", "path": str(path), "step": None}
    else:
        raise InputNotFoundError(
            f"model={path}: neither a trainer checkpoint (run dir / checkpoints / step dir) nor an upstream LlamaGen c2i file"
        )
    description["llamagen"] = asdict(model.config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), description


def load_vq_decoder(path: str | Path, config: LlamaGenVQConfig, device: torch.device | str) -> LlamaGenVQ:
    return LlamaGenVQ.from_checkpoint(path, config).to(device).eval()


@torch.inference_mode()
def decode_to_uint8(vq: LlamaGenVQ, codes: torch.Tensor):
    """codes [h, w] -> uint8 [H, W, 3]; one image per call so pixels never depend on batch mates."""
    device = vq.quantize.embedding.weight.device
    return pixels_to_uint8(vq.decode_codes(codes[None].to(device)))[0]


# ---- the samples of an evaluation ----------------------------------------------------------------


@dataclass(frozen=True)
class ClassSampleSpec:
    index: int  # global sample index k
    class_id: int
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:06d}.png"

    def manifest_entry(self) -> dict:
        return {"index": self.index, "class_id": self.class_id, "seed": self.seed, "file": f"images/{self.file_name}"}


def build_class_samples(classes: Sequence[int], samples_per_class: int, base_seed: int) -> list[ClassSampleSpec]:
    """Sample k: class ``classes[k // samples_per_class]``, seed ``seed_for_sample(base_seed, k)``."""
    return [
        ClassSampleSpec(k, int(classes[k // samples_per_class]), seed_for_sample(base_seed, k))
        for k in range(len(classes) * samples_per_class)
    ]


def generate_missing_class_images(
    sampler: ClassSampler, vq: LlamaGenVQ, samples: list[ClassSampleSpec], chunks: list[range], images_dir: Path,
    progress: bool,
) -> tuple[int, int]:
    """Generate and write the samples of ``chunks`` whose PNG is missing; returns (generated, kept)."""
    generated = kept = 0
    bar = tqdm(total=sum(len(c) for c in chunks), disable=not (progress and distributed.is_rank0()), desc="generate",
               dynamic_ncols=True)
    for chunk in chunks:
        todo = [samples[k] for k in chunk if not (images_dir / samples[k].file_name).is_file()]
        kept += len(chunk) - len(todo)
        if todo:
            codes = sampler.generate([s.class_id for s in todo], [s.seed for s in todo])
            for spec, grid in zip(todo, codes):
                save_png(decode_to_uint8(vq, grid), images_dir / spec.file_name)
            generated += len(todo)
        bar.update(len(chunk))
    bar.close()
    return generated, kept


def release_memory() -> None:
    """Free what generation held before feature extraction needs the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
