"""Distributed evaluation for any backbone: generate PNGs, extract features per rank, gather, report.

    torchrun --nproc_per_node=N launch/eval.py model=<run | checkpoint | model> prompts=<txt|json|MDS> \
        vqgan_config=vqgan.yaml vqgan_checkpoint=vqgan.ckpt extractors=[xrv] clip_model=biomedclip
    torchrun --nproc_per_node=N launch/eval.py model=<LlamaGen run> samples_per_prompt=50 \
        reference_stats={inception: VIRTUAL_imagenet256_labeled.npz}          # every class, FID + IS

Generation is ``arra_ds.generate.pipeline`` (per-sample seeds, fixed batches, chunk c on rank
c % world, resumable); a prompt is a text or a class label. Metrics read the PNGs back in the same chunks, so a
resumed run, and a run on any number of ranks, reports what an uninterrupted single-rank run would:

- ``fid_<extractor>`` for each extractor, against reference statistics (see ``eval/reference.py``; for
  ``inception`` also the ADM reference batch LlamaGen's numbers use);
- ``inception_score`` (ADM's form, from the FID Inception network's classifier; class-conditional models);
- ``ms_ssim_paired`` (the paper's form: generated vs its prompt's real image; higher is better) and
  ``ms_ssim_diversity`` (among the samples of one prompt; lower is more diverse);
- ``clip_score`` (mean image-prompt cosine; text prompts; over-long prompts are truncated and counted).

Outputs in ``output_dir`` (default ``<run dir>/evaluation/<checkpoint tag>`` for a trainer checkpoint):
``images/``, ``samples.jsonl``, ``reference/<extractor>.npz`` (cached reference statistics),
``report.json`` and ``tensorboard/`` (sample grid + metric scalars at the checkpoint's step).

What is left out comes from the run's data record (``arra_ds.checkpoints.RunData``): the VQGAN and
trained size (as for generation), the prompts (its held-out prompts), the FID extractors that work
offline on its data and the CLIP-Score model. A demo run therefore needs nothing but ``model=``:
its 64 held-out scenes, FID on 8 x 8 thumbnails, MS-SSIM and CLIP-Score with the demo encoder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import RUN_DATA_FILE, resolve_checkpoint
from arra_ds.distributed import gather_rows, init_process_group, my_chunks, sum_over_ranks
from arra_ds.errors import ConfigError
from arra_ds.eval.clip_score import build_clip_scorer
from arra_ds.eval.extractors import EXTRACTORS, build_extractor
from arra_ds.eval.fid import FeatureStats, read_reference
from arra_ds.eval.inception_score import ADM_SPLIT_SIZE, class_probabilities, inception_score
from arra_ds.eval.msssim import MSSSIM_SCALES, MSSSIMConfig, diversity_ms_ssim, ms_ssim_per_pair
from arra_ds.eval.reference import REFERENCE_FROM_PROMPTS, RealImages, cached_or_computed_stats, reference_items
from arra_ds.eval.summary import fid_score, sample_grid
from arra_ds.generate.images import load_rgb, to_chw_batch
from arra_ds.generate.pipeline import (
    GenerateConfig,
    ResolvedGeneration,
    SampleSpec,
    build_samples,
    check_decoder_files,
    generate_missing_images,
    load_decoder,
    prepare_output_dir,
    prompt_set_of,
    resolve_generation,
)
from arra_ds.generate.prompts import PromptSet
from arra_ds.io import atomic_write_json

AUTO = "auto"
DEFAULT_EXTRACTOR = "inception"
INCEPTION_SCORE_EXTRACTOR = "inception"  # IS reads the FID Inception network's classifier
DEFAULT_OUTPUT_DIR = "runs/eval"  # for models that are not trainer checkpoints
MIN_MS_SSIM_WINDOW = 3  # MSSSIMConfig.validate's smallest window
EVAL_DIR = "evaluation"  # <run dir>/evaluation/<tag>: the default output_dir for a trainer checkpoint
PAIRED_FORM = "generated image vs the real image of its prompt, mean over samples (the paper's MS-SSIM, higher is better)"
DIVERSITY_FORM = "mean over pairs of samples of one prompt, then over prompts (diversity, lower is more diverse)"


@dataclass
class EvalConfig(GenerateConfig):
    """Every generation key (model, prompts, classes, samples_per_prompt, batch_size, sampling.*, ...; see
    ``GenerateConfig``) plus what is measured on the samples. ``batch_size`` fixes the generation batches,
    keep it when resuming."""

    output_dir: str = ""  # "" = <run dir>/evaluation/<checkpoint tag> (trainer checkpoints), else runs/eval
    # FID feature extractors: inception, xrv, thumbnail, scene; "auto" = those the run's data record names (the
    # demo: thumbnail), else inception
    extractors: list[str] = field(default_factory=lambda: [AUTO])
    extractor_weights: dict[str, str] = field(default_factory=dict)  # name -> file | "random"; else the cache
    # real images for FID: "prompts" (those of the prompt source, if it has them), an image folder, an MDS
    # directory, or "" (no FID); statistics are cached in <output_dir>/reference/<extractor>.npz
    reference: str = REFERENCE_FROM_PROMPTS
    # name -> precomputed statistics (launch/fid_stats.py; checked), or for inception the ADM reference batch
    reference_stats: dict[str, str] = field(default_factory=dict)
    reference_limit: int = 0  # first n reference images; 0 = all
    feature_batch_size: int = 32  # reference images per extractor pass
    # biomedclip, hf-hub:..., local-dir:..., ARCH:WEIGHTS, random; "" = no CLIP-Score; "auto" = the run's
    # data record's (the demo: its encoder), else none. Text prompts only
    clip_model: str = AUTO
    # Inception Score (ADM's form): auto = for class-conditional models (ImageNet-like classes), on, off
    inception_score: Literal["auto", "on", "off"] = AUTO
    inception_score_split: int = ADM_SPLIT_SIZE  # samples per Inception Score split (ADM: 5000)
    ms_ssim: bool = True
    ms_ssim_config: MSSSIMConfig = field(default_factory=MSSSIMConfig)
    grid_size: int = 16  # samples in the tensorboard grid
    tensorboard: bool = True

    def validate(self) -> None:
        super().validate()
        if self.feature_batch_size < 1 or self.inception_score_split < 1:
            raise ConfigError("feature_batch_size and inception_score_split must be >= 1")
        if self.reference_limit < 0 or self.grid_size < 0:
            raise ConfigError("reference_limit and grid_size must be >= 0")
        unknown = [e for e in [*self.extractors, *self.extractor_weights, *self.reference_stats] if e not in (*EXTRACTORS, AUTO)]
        if unknown:
            raise ConfigError(f"unknown extractor(s) {unknown}; available: {sorted(EXTRACTORS)}")
        for name, path in self.reference_stats.items():
            if not Path(path).is_file():
                raise ConfigError(f"reference_stats.{name}={path} does not exist")
        self.ms_ssim_config.validate()


@dataclass
class ResolvedEval:
    """An evaluation with every default filled in (``run.cfg`` is the resolved EvalConfig), and the notes the
    report repeats about the defaults it used."""

    run: ResolvedGeneration
    notes: list[str]
    inception_score: bool

    @property
    def cfg(self) -> EvalConfig:
        return self.run.cfg


def resolve_eval(cfg: EvalConfig) -> ResolvedEval:
    """Fill what ``cfg`` leaves out: the generation defaults (``resolve_generation``), then from the model's data
    record its held-out prompts, the FID extractors that work offline on its data and the CLIP-Score model, the
    MS-SSIM window for small images and the output directory. ``cfg`` is left as it was."""
    run = resolve_generation(cfg)
    cfg, data, backbone = run.cfg, run.data, run.backbone
    from_record = []  # the keys the record supplied
    prompts = cfg.prompts
    if not (cfg.prompts or cfg.prompt_texts or cfg.classes) and data is not None and data.heldout_prompts:
        prompts = data.heldout_prompts
        from_record.append("prompts")
    if not (prompts or cfg.prompt_texts or cfg.classes) and backbone.condition == "text":
        raise ConfigError(
            f"prompts=<.txt | conversation .json | MDS dir> is required: {cfg.model} has no held-out prompts in a "
            f"data record ({RUN_DATA_FILE})"
        )
    extractors = cfg.extractors
    if extractors == [AUTO]:
        extractors = list(data.extractors) if data is not None and data.extractors else [DEFAULT_EXTRACTOR]
        if data is not None and data.extractors:
            from_record.append("extractors")
    clip_model = cfg.clip_model
    if clip_model == AUTO:
        clip_model = data.clip_model if data is not None and backbone.condition == "text" else ""
        if clip_model:
            from_record.append("clip_model")
    if clip_model and backbone.condition != "text":
        raise ConfigError(f"clip_model={clip_model}: CLIP-Score compares images with text prompts, and {cfg.model} "
                          "draws for class labels; set clip_model=")
    wants_is = cfg.inception_score == "on" or (cfg.inception_score == AUTO and backbone.condition == "class")
    if wants_is and INCEPTION_SCORE_EXTRACTOR not in extractors:
        if cfg.inception_score == "on":
            raise ConfigError(f"inception_score=on needs the {INCEPTION_SCORE_EXTRACTOR} extractor in extractors=")
        wants_is = False
    notes = [data.notes[key] for key in from_record if key in data.notes] if data is not None else []
    output_dir = cfg.output_dir
    if not output_dir:
        if run.ref.is_trainer_checkpoint:
            checkpoint = resolve_checkpoint(cfg.model)
            output_dir = str(checkpoint.run_dir / EVAL_DIR / checkpoint.tag)
        else:
            output_dir = DEFAULT_OUTPUT_DIR
    ms_ssim_config, window_note = fit_ms_ssim_window(cfg.ms_ssim, cfg.ms_ssim_config, min(cfg.sampling.height, cfg.sampling.width))
    if window_note:
        notes.append(window_note)
    resolved = replace(cfg, prompts=prompts, extractors=extractors, clip_model=clip_model, output_dir=output_dir,
                       ms_ssim_config=ms_ssim_config)
    return ResolvedEval(replace(run, cfg=resolved), notes, wants_is)


def fit_ms_ssim_window(enabled: bool, config: MSSSIMConfig, side: int) -> tuple[MSSSIMConfig, str | None]:
    """MS-SSIM's five scales need images of (win_size - 1) * 16 + 1 px; for smaller images (the demo's 128 px) the
    largest odd window that fits, and a note saying so (for the report); else (``config``, None)."""
    if not enabled or side >= config.min_image_size():
        return config, None
    largest = (side - 1) // 2 ** (MSSSIM_SCALES - 1) + 1
    largest -= 1 - largest % 2  # odd
    if largest < MIN_MS_SSIM_WINDOW:
        raise ConfigError(
            f"MS-SSIM needs images of at least {(MIN_MS_SSIM_WINDOW - 1) * 2 ** (MSSSIM_SCALES - 1) + 1} px "
            f"(got {side} px); set ms_ssim=false"
        )
    note = (
        f"ms_ssim: window {largest} instead of {config.win_size}: with {MSSSIM_SCALES} scales a "
        f"{config.win_size}-px window needs images of {config.min_image_size()} px, these are {side} px"
    )
    distributed.print0(note)
    return replace(config, win_size=largest), note


# ---- the run ------------------------------------------------------------------------------------
def _per_sample_metrics(cfg, samples, chunks, images_dir, extractors, clip, real: RealImages | None, progress):
    """Features, CLIP scores and paired MS-SSIM of this rank's samples: name -> (indices, values)."""
    out: dict[str, tuple[list, list]] = {}

    def add(name, indices, values):
        out.setdefault(name, ([], []))
        out[name][0].append(np.asarray(indices, np.int64))
        out[name][1].append(np.asarray(values, np.float64))

    for chunk in tqdm(chunks, disable=not (progress and distributed.is_rank0()), desc="metrics", dynamic_ncols=True):
        specs = [samples[k] for k in chunk]
        batch = to_chw_batch([load_rgb(images_dir / s.file_name) for s in specs])
        indices = [s.index for s in specs]
        for e in extractors:
            add(f"features/{e.name}", indices, e.extract(batch).numpy())
        if clip is not None:
            add("clip_score", indices, clip.scores(batch, [s.prompt.text for s in specs]))
            add("clip_truncated", indices, clip.truncated([s.prompt.text for s in specs]))
        if real is not None:
            reals: dict[int, np.ndarray | None] = {}
            for s in specs:  # one read per prompt, however many samples it has
                if s.prompt.index not in reals:
                    reals[s.prompt.index] = real.get(s.prompt)
            kept = [(s.index, image) for s, image in zip(specs, batch) if reals[s.prompt.index] is not None]
            if kept:
                generated = torch.stack([image for _, image in kept])
                paired_real = to_chw_batch([reals[samples[k].prompt.index] for k, _ in kept])
                scores = ms_ssim_per_pair(generated, paired_real, cfg.ms_ssim_config).numpy()
                add("ms_ssim_paired", [k for k, _ in kept], scores)
    return out


def _gather_metric(local: dict, name: str, width: int | None = None) -> np.ndarray:
    indices, values = local.get(name, ([], []))
    idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    if values:
        val = np.concatenate(values)
    else:
        val = np.zeros((0, width) if width else (0,))
    return gather_rows(idx, val)[1]


def _diversity(cfg, samples: list[SampleSpec], prompt_set: PromptSet, images_dir: Path) -> np.ndarray:
    """Per-prompt diversity MS-SSIM; prompt p is scored on rank p % world."""
    S = cfg.samples_per_prompt
    indices, values = [], []
    for p in prompt_set.prompts[distributed.rank() :: distributed.world_size()]:
        images = to_chw_batch([load_rgb(images_dir / samples[p.index * S + r].file_name) for r in range(S)])
        indices.append(p.index)
        values.append(diversity_ms_ssim(images, cfg.ms_ssim_config))
    return gather_rows(np.asarray(indices, np.int64), np.asarray(values, np.float64))[1]


def write_report(out_dir: Path, report: dict, samples: list[SampleSpec], grid_size: int, tensorboard: bool) -> None:
    """report.json, and (``tensorboard``) the first ``grid_size`` samples as a grid plus the metric scalars at the
    checkpoint's step in ``out_dir/tensorboard``."""
    atomic_write_json(out_dir / "report.json", report)
    if not tensorboard:
        return
    step = report["checkpoint"].get("step") or 0
    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    shown = samples[:grid_size]
    if shown:
        writer.add_image("eval/samples", sample_grid([out_dir / "images" / s.file_name for s in shown]), step)
    for name, value in report["metrics"].items():
        if value is not None:
            writer.add_scalar(f"eval/{name}", value, step)
    writer.flush()
    writer.close()


def run_eval(cfg: EvalConfig) -> dict:
    """Run the evaluation on this rank; returns the report on rank 0 and {} elsewhere."""
    resolved = resolve_eval(cfg)
    cfg, run = resolved.cfg, resolved.run
    check_decoder_files(run)
    start = time.perf_counter()
    device = init_process_group()
    out_dir = Path(cfg.output_dir)
    images_dir = out_dir / "images"
    prompt_set = prompt_set_of(run)
    samples = build_samples(prompt_set, cfg.samples_per_prompt, cfg.sampling.seed)
    prepare_output_dir(run, samples, out_dir)
    chunks = my_chunks(len(samples), cfg.batch_size)
    distributed.print0(
        f"eval: {len(prompt_set.prompts)} {'classes' if prompt_set.of_classes else 'prompts'} from {prompt_set.source} "
        f"x {cfg.samples_per_prompt} samples on {distributed.world_size()} rank(s)"
    )

    # ---- generate what is missing --------------------------------------------------------------
    generated, reused = generate_missing_images(run, samples, chunks, images_dir, device)
    distributed.barrier()
    generated, reused = sum_over_ranks([generated, reused])

    # ---- per-sample metrics (this rank's chunks), gathered in sample order ---------------------
    extractors = [build_extractor(name, cfg.extractor_weights.get(name, "")).to(device) for name in cfg.extractors]
    clip = build_clip_scorer(cfg.clip_model, device) if cfg.clip_model else None
    real = RealImages(cfg.sampling.height, cfg.sampling.width, decoder_factory=lambda: load_decoder(run, device))
    paired_real = real if (cfg.ms_ssim and prompt_set.has_real_images) else None
    local = _per_sample_metrics(cfg, samples, chunks, images_dir, extractors, clip, paired_real, cfg.progress_bar)
    generated_features = {e.name: _gather_metric(local, f"features/{e.name}", e.feature_dim) for e in extractors}
    clip_scores = _gather_metric(local, "clip_score") if clip else None
    clip_truncated = _gather_metric(local, "clip_truncated") if clip else None
    paired = _gather_metric(local, "ms_ssim_paired") if paired_real else None
    diversity = _diversity(cfg, samples, prompt_set, images_dir) if cfg.ms_ssim and cfg.samples_per_prompt > 1 else None

    # ---- reference statistics ------------------------------------------------------------------
    notes: list[str] = list(resolved.notes)
    reference: dict[str, FeatureStats] = {}
    reference_files: dict[str, str] = {}
    published: set[str] = set()  # extractors whose reference is a published batch of another implementation (ADM)
    for e in extractors:
        if e.name in cfg.reference_stats:
            reference[e.name], note = read_reference(cfg.reference_stats[e.name], e.name, e.weights_hash)
            reference_files[e.name] = cfg.reference_stats[e.name]
            if note:
                notes.append(note)
                published.add(e.name)
    to_compute = [e for e in extractors if e.name not in reference] if cfg.reference else []
    if to_compute and cfg.reference == REFERENCE_FROM_PROMPTS and not prompt_set.has_real_images:
        notes.append(
            f"fid: the prompts ({prompt_set.source}, {prompt_set.kind}) carry no real images; give reference_stats= "
            "or reference=<image folder | MDS dir>"
        )
        to_compute = []
    if to_compute:
        items = reference_items(cfg.reference, prompt_set, run.ref.vocab(), cfg.reference_limit)
        source = {
            "reference": cfg.reference, "num_items": len(items), "height": cfg.sampling.height, "width": cfg.sampling.width,
        }
        cache_dir = out_dir / "reference"
        computed = cached_or_computed_stats(
            to_compute, items, real, cfg.feature_batch_size, source, cache_dir, cfg.progress_bar
        )
        reference.update(computed)
        reference_files.update({name: str(cache_dir / f"{name}.npz") for name in computed})
    real_failures = real.report_failures()

    if not distributed.is_rank0():
        return {}

    # ---- report (rank 0) -----------------------------------------------------------------------
    if real_failures:
        notes.append(f"{real_failures} real image(s) could not be read and were left out (listed in the ranks' output)")
    metrics: dict[str, float | None] = {}
    reference_info: dict[str, dict] = {}
    for e in extractors:
        key = f"fid_{e.name}"
        features = generated_features[e.name]
        metrics[key] = None
        if e.name not in reference:
            notes.append(f"{key}: no reference statistics (reference= is empty or has < 2 readable images)")
        elif len(features) < 2:
            notes.append(f"{key}: needs at least 2 generated samples")
        else:
            ref = reference[e.name]
            metrics[key] = fid_score(features, e, ref, same_weights=e.name not in published)
            reference_info[e.name] = {
                "stats_file": reference_files[e.name], "num_samples": ref.num_samples, "source": ref.source,
            }
    if resolved.inception_score:
        inception = next(e for e in extractors if e.name == INCEPTION_SCORE_EXTRACTOR)
        probabilities = class_probabilities(generated_features[inception.name], inception.network)
        metrics["inception_score"] = inception_score(probabilities, cfg.inception_score_split)
    metrics["ms_ssim_paired"] = float(paired.mean()) if paired is not None and len(paired) else None
    metrics["ms_ssim_diversity"] = float(diversity.mean()) if diversity is not None and len(diversity) else None
    metrics["clip_score"] = float(clip_scores.mean()) if clip_scores is not None and len(clip_scores) else None
    if cfg.ms_ssim and paired is None:
        notes.append("ms_ssim_paired: the prompt source carries no real images")
    if cfg.ms_ssim and diversity is None:
        notes.append("ms_ssim_diversity: needs samples_per_prompt >= 2")
    if clip_truncated is not None and clip_truncated.sum():
        notes.append(f"clip_score: {int(clip_truncated.sum())} prompt(s) longer than the text context were truncated")

    report = {
        "model": cfg.model,
        "checkpoint": run.ref.description,
        "num_samples": len(samples),
        "num_prompts": len(prompt_set.prompts),
        "samples_per_prompt": cfg.samples_per_prompt,
        "metrics": metrics,
        "extractors": {e.name: e.describe() for e in extractors},
        "reference": reference_info,
        "inception_score": {
            "split_size": cfg.inception_score_split, "logits": "pool3 @ fc.weight (no bias), as ADM",
        } if resolved.inception_score else None,
        "ms_ssim": {
            "paired": {"form": PAIRED_FORM, "num_pairs": 0 if paired is None else len(paired)},
            "diversity": {"form": DIVERSITY_FORM, "num_prompts": 0 if diversity is None else len(diversity)},
            "config": asdict(cfg.ms_ssim_config),
        } if cfg.ms_ssim else None,
        "clip": None if clip is None else {
            "model": clip.name,
            "score": "mean cosine similarity of image and prompt embeddings",
            "context_length": clip.context_length,
            "truncated_prompts": int(clip_truncated.sum()),
            "num_samples": len(clip_truncated),
        },
        "sampling": cfg.sampling.as_dict(),
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "prompts": {"source": prompt_set.source, "kind": prompt_set.kind, "skipped": prompt_set.skipped},
        "generation": {"generated": generated, "reused": reused},
        "world_size": distributed.world_size(),
        "notes": notes,
        "wall_s": time.perf_counter() - start,
    }
    write_report(out_dir, report, samples, cfg.grid_size, cfg.tensorboard)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
    print(
        f"eval done: {len(samples)} samples ({generated} generated, {reused} reused); {shown}; "
        f"report {out_dir / 'report.json'}",
        flush=True,
    )
    for note in notes:  # what the numbers above mean where a default shaped them (the demo's CLIP-Score, its FID)
        print(f"note: {note}", flush=True)
    return report
