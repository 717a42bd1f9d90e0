"""Real images and the reference statistics FID compares against.

Real images are brought to the generated size the way the training data was prepared (Lumina-mGPT's
BOX-halving + BICUBIC resize + centre crop), then go through the same extractor path as the
generated PNGs. Sources:

- ``prompts``: the real images that come with the evaluation prompts (conversation JSON: the image
  files; MDS: the VQGAN reconstruction of the stored codes);
- an image folder (every image below it, sorted by path);
- an MDS directory (VQGAN reconstructions of its samples).

Features are computed on all ranks in fixed chunks and gathered; the statistics are saved as
``.npz`` with the extractor name, the weights hash and a description of the source, and a later run
reuses them only when all three match.

    torchrun --nproc_per_node=N launch/fid_stats.py source=<folder | MDS dir> extractors=[xrv] \
        output_dir=stats height=512 width=512
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.distributed import gather_rows, init_process_group, my_chunks, sum_over_ranks
from arra_ds.errors import ConfigError
from arra_ds.eval.extractors import EXTRACTORS, FeatureExtractor, build_extractor
from arra_ds.eval.fid import FeatureStats, load_stats
from arra_ds.generate.images import fit_to_size, list_images, load_rgb, to_chw_batch
from arra_ds.generate.loading import resolve_model
from arra_ds.generate.pipeline import decode_to_uint8
from arra_ds.generate.prompts import Prompt, PromptSet, load_prompts
from arra_ds.model.interface import ImageDecoder

REFERENCE_FROM_PROMPTS = "prompts"


class RealImages:
    """Real images at the generated size; unreadable ones are recorded and skipped, never fatal. Images stored as
    VQ codes (MDS data) are decoded with ``decoder``, or the one ``decoder_factory`` loads on first use."""

    def __init__(
        self, height: int, width: int, decoder: ImageDecoder | None = None,
        decoder_factory: Callable[[], ImageDecoder] | None = None,
    ):
        self.height, self.width = height, width
        self._decoder = decoder
        self._decoder_factory = decoder_factory
        self.failures: dict[str, str] = {}  # image -> reason

    def _decoder_for_codes(self) -> ImageDecoder:
        if self._decoder is None:
            if self._decoder_factory is None:
                raise ConfigError("real images stored as VQ codes (MDS) need the image tokenizer: vqgan_config and vqgan_checkpoint")
            self._decoder = self._decoder_factory()
        return self._decoder

    def get(self, item) -> np.ndarray | None:
        """``item``: a Prompt (its real image), an image path, or VQ codes [h, w] -> uint8 [H, W, 3]."""
        if isinstance(item, Prompt):
            item = item.real_image_path if item.real_image_path is not None else item.real_codes
        try:
            if isinstance(item, np.ndarray):
                image = decode_to_uint8(self._decoder_for_codes(), torch.from_numpy(item))
            else:
                image = load_rgb(item)
        except (OSError, ValueError) as e:
            self.failures["<VQ codes>" if isinstance(item, np.ndarray) else str(item)] = str(e)
            return None
        return fit_to_size(image, self.height, self.width)

    def report_failures(self) -> int:
        """Print this rank's unreadable images; the number over all ranks."""
        for image, reason in self.failures.items():
            print(f"rank {distributed.rank()}: real image left out: {image}: {reason}", flush=True)
        return sum_over_ranks([len(self.failures)])[0]


def reference_items(source: str, prompt_set: PromptSet | None, vocab, limit: int = 0, model_given: bool = True) -> list:
    """The real images (Prompts or paths) of a reference source (``vocab``: the model's text vocabulary, None for a
    class-conditional model)."""
    if source == REFERENCE_FROM_PROMPTS:
        if prompt_set is None or not prompt_set.has_real_images:
            where = f"{prompt_set.source} ({prompt_set.kind})" if prompt_set else "none"
            raise ConfigError(
                f"reference=prompts, but the prompt source {where} carries no real images; give "
                "reference=<image folder | MDS dir>, reference_stats=<npz>, or reference= (no FID)"
            )
        items: list = list(prompt_set.prompts)
    elif (Path(source) / "index.json").is_file():
        if not model_given:
            raise ConfigError(f"reading the MDS reference {source} needs the model whose data it is (model=...)")
        items = list(load_prompts(source, vocab, limit).prompts)
    else:
        items = [str(p) for p in list_images(source)]
    return items[:limit] if limit else items


def compute_reference_stats(
    extractors: list[FeatureExtractor], items: list, real: RealImages, batch_size: int, source: dict, progress: bool
) -> dict[str, FeatureStats]:
    """Features of ``items`` on all ranks (chunk c on rank c % world), gathered; name -> stats."""
    local: dict[str, tuple[list, list]] = {e.name: ([], []) for e in extractors}
    chunks = my_chunks(len(items), batch_size)
    for chunk in tqdm(chunks, disable=not (progress and distributed.is_rank0()), desc="reference", dynamic_ncols=True):
        images, indices = [], []
        for i in chunk:
            image = real.get(items[i])
            if image is not None:
                images.append(image)
                indices.append(i)
        if not images:
            continue
        batch = to_chw_batch(images)
        for e in extractors:
            local[e.name][0].append(np.asarray(indices, np.int64))
            local[e.name][1].append(e.extract(batch).numpy())
    stats = {}
    for e in extractors:
        indices, rows = local[e.name]
        idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        values = np.concatenate(rows) if rows else np.zeros((0, e.feature_dim))
        _, features = gather_rows(idx, values)
        if len(features) >= 2:
            stats[e.name] = FeatureStats.from_features(features, e.name, e.weights_hash, source)
    return stats


def cached_or_computed_stats(
    extractors: list[FeatureExtractor], items: list, real: RealImages, batch_size: int, source: dict,
    cache_dir: Path, progress: bool,
) -> dict[str, FeatureStats]:
    """Reuse ``cache_dir/<extractor>.npz`` where extractor, weights and source match; compute the rest
    (all ranks take part) and save them (rank 0)."""
    stats: dict[str, FeatureStats] = {}
    for e in extractors:
        path = cache_dir / f"{e.name}.npz"
        if path.is_file():
            cached = load_stats(path)
            if cached.extractor == e.name and cached.weights_hash == e.weights_hash and cached.source == source:
                stats[e.name] = cached
    missing = [e for e in extractors if e.name not in stats]
    if missing:
        computed = compute_reference_stats(missing, items, real, batch_size, source, progress)
        if distributed.is_rank0():
            for name, value in computed.items():
                value.save(cache_dir / f"{name}.npz")
        stats.update(computed)
    return stats


@dataclass
class ReferenceStatsConfig:
    source: str = ""  # image folder or MDS directory
    extractors: list[str] = field(default_factory=lambda: ["inception"])
    extractor_weights: dict[str, str] = field(default_factory=dict)  # name -> file | "random"; else the cache
    height: int = 512  # the size generated images will have
    width: int = 512
    limit: int = 0
    batch_size: int = 32
    output_dir: str = "runs/fid_stats"  # writes <output_dir>/<extractor>.npz
    model: str = ""  # MDS source only: the model whose data it is (its vocabulary reads the tokens)
    vqgan_config: str = ""  # MDS source only: the image tokenizer that decodes the stored codes
    vqgan_checkpoint: str = ""
    progress_bar: bool = True

    def validate(self) -> None:

        if not self.source:
            raise ConfigError("source=<image folder | MDS dir> is required")
        unknown = [e for e in self.extractors if e not in EXTRACTORS]
        if unknown or not self.extractors:
            raise ConfigError(f"extractors={self.extractors}: use some of {sorted(EXTRACTORS)}")
        if (Path(self.source) / "index.json").is_file() and not (self.model and self.vqgan_checkpoint):
            raise ConfigError("an MDS source needs model= and vqgan_checkpoint= (and vqgan_config=): its images are VQ codes")
        if self.height < 1 or self.width < 1 or self.batch_size < 1 or self.limit < 0:
            raise ConfigError("height, width and batch_size must be >= 1, limit >= 0")


def write_reference_stats(cfg: ReferenceStatsConfig) -> dict[str, str]:
    """Compute and save the statistics; returns extractor -> npz path."""
    cfg.validate()
    device = init_process_group()
    ref = resolve_model(cfg.model) if cfg.model else None
    items = reference_items(cfg.source, None, ref.vocab() if ref else None, cfg.limit, model_given=ref is not None)
    factory = None
    if ref is not None:
        factory = lambda: ref.backbone.load_decoder(cfg.vqgan_config, cfg.vqgan_checkpoint).to(device)  # noqa: E731
    real = RealImages(cfg.height, cfg.width, decoder_factory=factory)
    extractors = [build_extractor(name, cfg.extractor_weights.get(name, "")).to(device) for name in cfg.extractors]
    source = {"reference": cfg.source, "num_items": len(items), "height": cfg.height, "width": cfg.width}
    out = Path(cfg.output_dir)
    stats = cached_or_computed_stats(extractors, items, real, cfg.batch_size, source, out, cfg.progress_bar)
    failures = real.report_failures()
    paths = {name: str(out / f"{name}.npz") for name in stats}
    if distributed.is_rank0():
        for name, value in stats.items():
            print(f"{name}: {value.num_samples} images -> {paths[name]} (weights {value.weights_hash[:16]})", flush=True)
        if failures:
            print(f"{failures} unreadable image(s) left out", flush=True)
    return paths
