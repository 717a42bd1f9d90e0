"""Class-conditional evaluation (ARRA-Base / LlamaGen): sample N images per class on all ranks, then FID and IS.

    torchrun --nproc_per_node=8 launch/eval_c2i.py model=runs/llamagen_b_arra_base vq_ckpt=ckpts/vq_ds16_c2i.pt \
        reference_stats=ckpts/VIRTUAL_imagenet256_labeled.npz samples_per_class=50 sampling.cfg_scale=2.0

Generation is ``arra_ds.generate.c2i`` (per-sample seeds, fixed chunks, chunk c on rank c % world,
resumable). The PNGs are read back in the same chunks and go through the FID Inception network once:
its pool3 features give FID against ``reference_stats`` and its class logits (without bias, as the ADM
evaluator) give the Inception Score, so a resumed run, and a run on any number of ranks, reports what
an uninterrupted single-rank run would.

``reference_stats`` is an arra_ds statistics file (``launch/fid_stats.py`` over real images at the
generated size, checked against the extractor's weights) or the ADM reference batch LlamaGen's numbers
use (``VIRTUAL_imagenet256_labeled.npz``: its ``mu`` / ``sigma`` come from TensorFlow's Inception graph,
of which the ``inception`` extractor is the PyTorch port; the report says so, as FIDs can differ
slightly from the TensorFlow evaluator's).

Outputs in ``output_dir``: ``images/``, ``samples.jsonl``, ``report.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.distributed import compute_dtype, gather_rows, init_process_group, my_chunks, sum_over_ranks
from arra_ds.errors import ConfigError
from arra_ds.eval.extractors import FeatureExtractor, build_extractor
from arra_ds.eval.fid import (
    FeatureStats,
    frechet_distance,
    is_arra_stats_file,
    load_adm_reference_batch,
    load_stats,
)
from arra_ds.eval.inception_score import ADM_SPLIT_SIZE, class_probabilities, inception_score
from arra_ds.eval.summary import sample_grid
from arra_ds.generate.c2i import (
    ClassSampler,
    ClassSampleSpec,
    ClassSamplingConfig,
    build_class_samples,
    generate_missing_class_images,
    load_class_model,
    load_vq_decoder,
    release_memory,
)
from arra_ds.generate.images import load_rgb, to_chw_batch
from arra_ds.io import atomic_write, atomic_write_json
from arra_ds.model.llamagen import LlamaGenConfig
from arra_ds.tokens.llamagen_vq import LlamaGenVQConfig

EXTRACTOR = "inception"  # FID and IS on ImageNet: the FID Inception network


@dataclass
class ClassEvalConfig:
    model: str = ""  # trainer checkpoint of a model.source=llamagen run, or an upstream LlamaGen c2i .pt
    llamagen: LlamaGenConfig = field(default_factory=LlamaGenConfig)  # sizes of an upstream .pt (a run has its own)
    vq_ckpt: str = ""  # LlamaGen VQ tokenizer (vq_ds16_c2i.pt): decodes the codes
    vq: LlamaGenVQConfig = field(default_factory=LlamaGenVQConfig)
    classes: list[int] = field(default_factory=list)  # class ids to sample; [] = all of the model's
    samples_per_class: int = 50  # 50 x 1000 classes = the usual 50,000 FID samples
    batch_size: int = 32  # images per generation batch (fixes the chunks: keep it when resuming)
    output_dir: str = "runs/eval_c2i"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sampling: ClassSamplingConfig = field(default_factory=ClassSamplingConfig)
    extractor_weights: str = ""  # FID Inception weights: file, "random" (tests), or "" for the library cache
    reference_stats: str = ""  # ADM reference batch (.npz with mu / sigma) or an arra_ds statistics file; "" = no FID
    inception_score_split: int = ADM_SPLIT_SIZE  # samples per Inception Score split (ADM: 5000)
    grid_size: int = 16  # samples in the tensorboard grid
    tensorboard: bool = True
    progress_bar: bool = True

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model=<trainer checkpoint of a llamagen run | upstream c2i .pt> is required")
        if not self.vq_ckpt or not Path(self.vq_ckpt).is_file():
            raise ConfigError(f"vq_ckpt={self.vq_ckpt!r}: pass the local LlamaGen VQ checkpoint (vq_ds16_c2i.pt)")
        if self.reference_stats and not Path(self.reference_stats).is_file():
            raise ConfigError(f"reference_stats={self.reference_stats} does not exist")
        if self.samples_per_class < 1 or self.batch_size < 1 or self.inception_score_split < 1 or self.grid_size < 0:
            raise ConfigError("samples_per_class, batch_size and inception_score_split must be >= 1, grid_size >= 0")
        if any(c < 0 for c in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes={self.classes} must be distinct class ids >= 0")
        self.llamagen.validate()
        self.vq.validate()
        self.sampling.validate()


def read_reference(path: str, extractor: FeatureExtractor) -> tuple[FeatureStats, str | None]:
    """(statistics, a note for the report or None): an arra_ds file (checked) or an ADM reference batch."""
    if is_arra_stats_file(path):
        return load_stats(path, extractor.name, extractor.weights_hash), None
    note = (
        f"reference {path} is an ADM reference batch: TensorFlow Inception statistics, compared with this PyTorch "
        "port's features (pytorch-fid weights); FID can differ slightly from the ADM evaluator's"
    )
    return load_adm_reference_batch(path), note


def _features(samples: list[ClassSampleSpec], chunks: list[range], images_dir: Path, extractor, progress) -> np.ndarray:
    """pool3 features of every sample in sample order (this rank's chunks, then gathered over ranks)."""
    indices, rows = [], []
    for chunk in tqdm(chunks, disable=not (progress and distributed.is_rank0()), desc="features", dynamic_ncols=True):
        batch = to_chw_batch([load_rgb(images_dir / samples[k].file_name) for k in chunk])
        indices.append(np.asarray(list(chunk), np.int64))
        rows.append(extractor.extract(batch).numpy())
    idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    values = np.concatenate(rows) if rows else np.zeros((0, extractor.feature_dim))
    return gather_rows(idx, values)[1]


def run_class_eval(cfg: ClassEvalConfig) -> dict:
    """Generate what is missing, measure; returns the report on rank 0 and {} elsewhere."""
    cfg.validate()
    start = time.perf_counter()
    device = init_process_group()
    out_dir = Path(cfg.output_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    # ---- the model decides the classes; it is only kept if an image is missing ------------------
    model, description = load_class_model(cfg.model, cfg.llamagen, compute_dtype(cfg.precision, device), device)
    num_classes = model.config.num_classes
    classes = cfg.classes or list(range(num_classes))
    if max(classes) >= num_classes:
        raise ConfigError(f"classes={cfg.classes}: the model has {num_classes} classes (ids 0..{num_classes - 1})")
    samples = build_class_samples(classes, cfg.samples_per_class, cfg.sampling.seed)
    chunks = my_chunks(len(samples), cfg.batch_size)
    distributed.print0(
        f"eval: {len(classes)} classes x {cfg.samples_per_class} samples on {distributed.world_size()} rank(s)"
    )
    generated = kept = 0
    if any(not (images_dir / samples[k].file_name).is_file() for chunk in chunks for k in chunk):
        vq = load_vq_decoder(cfg.vq_ckpt, cfg.vq, device)
        generated, kept = generate_missing_class_images(
            ClassSampler(model, cfg.sampling), vq, samples, chunks, images_dir, cfg.progress_bar
        )
        del vq
    else:
        kept = sum(len(chunk) for chunk in chunks)
    del model
    release_memory()
    distributed.barrier()
    generated, kept = sum_over_ranks([generated, kept])
    if distributed.is_rank0():
        atomic_write(out_dir / "samples.jsonl", "".join(json.dumps(s.manifest_entry()) + "\n" for s in samples))

    # ---- features, FID, IS -----------------------------------------------------------------------
    extractor = build_extractor(EXTRACTOR, cfg.extractor_weights).to(device)
    features = _features(samples, chunks, images_dir, extractor, cfg.progress_bar)
    if not distributed.is_rank0():
        return {}
    notes: list[str] = []
    metrics: dict[str, float | None] = {"fid": None, "inception_score": None}
    reference_info = None
    if cfg.reference_stats and len(features) >= 2:
        reference, note = read_reference(cfg.reference_stats, extractor)
        generated_stats = FeatureStats.from_features(features, extractor.name, extractor.weights_hash)
        metrics["fid"] = frechet_distance(generated_stats.mu, generated_stats.sigma, reference.mu, reference.sigma)
        reference_info = {"stats_file": cfg.reference_stats, "num_samples": reference.num_samples, "source": reference.source}
        if note:
            notes.append(note)
    elif cfg.reference_stats:
        notes.append("fid: needs at least 2 samples")
    else:
        notes.append("fid: no reference_stats given")
    metrics["inception_score"] = inception_score(class_probabilities(features, extractor.network), cfg.inception_score_split)

    report = {
        "model": cfg.model,
        "checkpoint": description,
        "num_samples": len(samples),
        "num_classes": len(classes),
        "samples_per_class": cfg.samples_per_class,
        "metrics": metrics,
        "extractor": {EXTRACTOR: extractor.describe()},
        "reference": reference_info,
        "inception_score": {"split_size": cfg.inception_score_split, "logits": "pool3 @ fc.weight (no bias), as ADM"},
        "sampling": cfg.sampling.as_dict(),
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "generation": {"generated": generated, "reused": kept},
        "world_size": distributed.world_size(),
        "notes": notes,
        "wall_s": time.perf_counter() - start,
    }
    atomic_write_json(out_dir / "report.json", report)
    if cfg.tensorboard:
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        step = description.get("step") or 0
        shown = samples[: cfg.grid_size]
        if shown:
            writer.add_image("eval/samples", sample_grid([images_dir / s.file_name for s in shown]), step)
        for name, value in metrics.items():
            if value is not None:
                writer.add_scalar(f"eval/{name}", value, step)
        writer.close()
    shown_metrics = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
    print(
        f"eval done: {len(samples)} samples ({generated} generated, {kept} reused); {shown_metrics}; "
        f"report {out_dir / 'report.json'}",
        flush=True,
    )
    return report


__all__ = ["ClassEvalConfig", "read_reference", "run_class_eval"]
