"""A small evaluation inside training: every ``train.eval_every`` steps and at the end, sample images
for the first ``eval.num_prompts`` training prompts (the same prompts and seeds every time, so grids
are comparable across steps), decode them, log the grid (and FID when ``eval.extractor`` is set) to
tensorboard, and keep the latest grid as ``<run_dir>/samples.png``.

The training model is never put in eval mode or touched: its weights are copied, one module at a
time, into a plain (hook-free) backbone through ``gather`` (the engine's read-only ZeRO-3 gather,
so no rank ever holds two full copies of a layer) and that copy generates. Generation draws from
per-sample generators inside ``torch.random.fork_rng``, so the training RNG streams, and therefore a
resumed run, are unaffected. Prompts are split over ranks as in ``launch/eval.py``; every rank takes
part in the collectives.

The decoder is ``eval.vqgan_*``, by default the VQGAN the data was pre-tokenised with (the run's data
record: the demo's models, or ``pretokenize_meta.json`` of local data).

FID here uses few samples (N << feature width): it is a trend to watch during training, not a number
to report; use ``launch/eval.py`` on the saved checkpoint for that. The reference statistics are the
VQ reconstructions of the same prompts' training images, computed at the first evaluation and kept
in ``<run_dir>/eval/reference/<extractor>.npz``. The demo run logs no FID (``eval.extractor: ""``):
no Inception or XRV weights exist offline, and 8 samples give no usable FID with any extractor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import RunData
from arra_ds.data.pretokenize.config import META_FILE as PRETOKENIZE_META
from arra_ds.distributed import gather_rows, my_chunks
from arra_ds.errors import ConfigError
from arra_ds.eval.extractors import EXTRACTORS, build_extractor
from arra_ds.eval.reference import RealImages, cached_or_computed_stats
from arra_ds.eval.summary import captioned_grid, fid_score
from arra_ds.generate.images import load_rgb, save_png, to_chw_batch
from arra_ds.generate.pipeline import build_samples, generate_missing
from arra_ds.generate.prompts import load_prompts
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.io import atomic_write
from arra_ds.model.arra import training_skeleton
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import GatherContext

SAMPLES_PNG = "samples.png"  # the latest sample grid, each tile captioned with its prompt, in the run directory
SAMPLES_TXT = "samples.txt"  # the grid's prompts, tile by tile


@dataclass
class TrainEvalConfig:
    """Settings of the in-training evaluation (``train.eval_every`` > 0 turns it on)."""

    num_prompts: int = 8  # the first n samples of the training data (prompt or class + real image codes)
    # the image tokenizer that decodes the data's codes (Chameleon vqgan.yaml + vqgan.ckpt, LlamaGen VQ yaml +
    # checkpoint); "" = the one the data was pre-tokenised with
    vqgan_config: str = ""
    vqgan_checkpoint: str = ""
    extractor: str = "inception"  # FID features: inception | xrv | thumbnail; "" = no FID (grid only)
    extractor_weights: str = ""  # file, "random", or "" for the library cache
    batch_size: int = 8
    size_from_data: bool = True  # generate at the size of the data's images (else sampling.height/width)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:
        if self.vqgan_config and not self.vqgan_checkpoint:
            raise ConfigError(
                "eval.vqgan_config goes with eval.vqgan_checkpoint (the image tokenizer that decodes the data's codes); "
                "leave both empty to use the one the data was pre-tokenised with"
            )
        for key, path in (("eval.vqgan_config", self.vqgan_config), ("eval.vqgan_checkpoint", self.vqgan_checkpoint)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}={path} does not exist")
        if self.extractor and self.extractor not in EXTRACTORS:
            raise ConfigError(f"eval.extractor={self.extractor!r}: use one of {sorted(EXTRACTORS)} or \"\" (no FID)")
        if self.num_prompts < 2 or self.batch_size < 1:
            raise ConfigError("eval.num_prompts must be >= 2 (FID needs two samples) and eval.batch_size >= 1")
        self.sampling.validate()


def inference_copy(
    backbone: nn.Module, model_cfg: ModelConfig, gather: GatherContext, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A plain (hook-free) copy of the training ``backbone`` (its training skeleton: LoRA layers included), built on
    the meta device and filled one module at a time inside ``gather`` (ZeRO-3 partitioned weights are whole only
    inside it)."""
    copy = training_skeleton(model_cfg, dtype)
    copy.to_empty(device=device)
    target = dict(copy.named_modules())
    with torch.no_grad():
        for name, module in backbone.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            with gather(own):
                for param_name, param in module.named_parameters(recurse=False):
                    getattr(target[name], param_name).copy_(param.detach())
        for name, buffer in backbone.named_buffers():  # ZeRO-3 partitions parameters only
            module_name, _, buffer_name = name.rpartition(".")
            getattr(target[module_name], buffer_name).copy_(buffer)
    if hasattr(copy, "config") and hasattr(copy.config, "use_cache"):
        copy.config.use_cache = True  # Hugging Face models: sampling runs with a KV cache
    return copy.eval().requires_grad_(False)


NO_DECODER = (
    f"the decoder of the data's image codes: the data names no image tokenizer (no {PRETOKENIZE_META} next to its "
    "shards); pass eval.vqgan_config=<config> eval.vqgan_checkpoint=<weights>"
)


def decoder_files(cfg: TrainEvalConfig, data: RunData | None) -> tuple[str, str]:
    """(vqgan.yaml, vqgan.ckpt): eval.vqgan_* when given, else the data's own VQGAN, else ("", "")."""
    if cfg.vqgan_checkpoint:
        return cfg.vqgan_config, cfg.vqgan_checkpoint
    if data is not None and data.vqgan_checkpoint:
        return data.vqgan_config, data.vqgan_checkpoint
    return "", ""


def build_train_evaluator(cfg: TrainEvalConfig, model_cfg: ModelConfig, dataset, vocab, run_dir: Path,
                          device: torch.device, source: str, data: RunData | None) -> "TrainEvaluator | None":
    """The evaluator, or None (and one line saying why) when no decoder is known: train.eval_every is on in
    the embedded default config, which also trains on data of unknown origin (data.path=<MDS dir>)."""
    if not decoder_files(cfg, data)[1]:
        distributed.print0(f"in-training eval (train.eval_every > 0) is off: it needs {NO_DECODER}")
        return None
    return TrainEvaluator(cfg, model_cfg, dataset, vocab, run_dir, device, source, data)


class TrainEvaluator:
    """Holds the prompts, decoder, extractor and reference statistics between evaluations."""

    def __init__(
        self, cfg: TrainEvalConfig, model_cfg: ModelConfig, dataset, vocab, run_dir: Path, device: torch.device,
        source: str, data: RunData | None = None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.backbone = model_cfg.backbone
        self.vocab = vocab
        self.device = device
        self.run_dir = run_dir
        self.out_dir = run_dir / "eval"
        self.rep_token = data is not None and data.rep_token
        vqgan_config, vqgan_checkpoint = decoder_files(cfg, data)
        if not vqgan_checkpoint:
            raise ConfigError(f"train.eval_every > 0 needs {NO_DECODER}")
        self.prompts = load_prompts(source, vocab, cfg.num_prompts, dataset=dataset)
        with self._training_rng_untouched():  # building the decoder initialises weights from the global RNG
            self.decoder = self.backbone.load_decoder(vqgan_config, vqgan_checkpoint).to(device)
            self.extractor = build_extractor(cfg.extractor, cfg.extractor_weights).to(device) if cfg.extractor else None
        factor = self.decoder.downsample_factor
        if factor != self.backbone.code_patch_px:
            raise ConfigError(
                f"eval.vqgan_config: the image tokenizer downsamples by {factor}, but model.source={self.backbone.name} "
                f"has one code per {self.backbone.code_patch_px} px; use the one the data was pre-tokenised with"
            )
        sampling = cfg.sampling.with_defaults(self.backbone.sampling_defaults)
        if cfg.size_from_data and self.prompts.prompts[0].real_codes is not None:
            h, w = self.prompts.prompts[0].real_codes.shape
            sampling = replace(sampling, height=h * factor, width=w * factor)
        self.grid = self.backbone.sampling_grid(model_cfg, sampling.height, sampling.width)
        self.sampling = replace(sampling, height=self.grid[0] * factor, width=self.grid[1] * factor)
        self.samples = build_samples(self.prompts, 1, self.sampling.seed)
        self.reference = None

    def _training_rng_untouched(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _reference_stats(self):
        if self.reference is None and self.extractor is not None:
            real = RealImages(self.sampling.height, self.sampling.width, decoder=self.decoder)
            source = {"reference": "training data (VQ reconstructions)", "num_items": len(self.prompts.prompts),
                      "height": self.sampling.height, "width": self.sampling.width}
            stats = cached_or_computed_stats([self.extractor], self.prompts.prompts, real, self.cfg.batch_size, source,
                                             self.out_dir / "reference", progress=False)
            self.reference = stats.get(self.extractor.name)
        return self.reference

    def log(self, engine, step: int, logger) -> None:
        """Evaluate the engine's current weights and log the scalars and the sample grid (rank 0)."""
        dtype = torch.bfloat16 if engine.precision == "bf16" else torch.float32
        scalars, grid = self.run(engine.model.backbone, engine.gathered_for_reading, step, dtype)
        if distributed.is_rank0():
            if scalars:
                logger.log(step, scalars)
            logger.add_image("eval/samples", grid, step)
            save_png(np.ascontiguousarray(grid.transpose(1, 2, 0)), self.run_dir / SAMPLES_PNG)  # [H, W, 3]
            atomic_write(self.run_dir / SAMPLES_TXT, "".join(
                f"{i}\t{s.prompt.text}\n" for i, s in enumerate(self.samples)))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scalars.items())
            if self.extractor is None:
                shown = "sample grid"
            elif not shown:
                shown = "no reference statistics"
            where = self.out_dir / f"step_{step:08d}"
            # tqdm.write: a line of its own above the training progress bar, not in the middle of it
            tqdm.write(f"eval at step {step}: {shown}; images in {where}, latest grid {self.run_dir / SAMPLES_PNG}")

    def run(
        self, backbone: nn.Module, gather: GatherContext, step: int, dtype: torch.dtype
    ) -> tuple[dict, np.ndarray | None]:
        """Generate, decode, score. Returns ({"eval/fid_<extractor>": value} or {} without an extractor,
        grid [3, H, W] uint8) on rank 0, ({}, None) elsewhere."""
        images_dir = self.out_dir / f"step_{step:08d}"
        with self._training_rng_untouched():
            model = inference_copy(backbone, self.model_cfg, gather, self.device, dtype)
            sampler = Sampler(self.backbone, model, self.vocab, self.sampling, self.grid, self.rep_token)
            chunks = my_chunks(len(self.samples), self.cfg.batch_size)
            generate_missing(sampler, self.decoder, _prompt_ids_only, self.samples, chunks, images_dir, progress=False)
            del model, sampler
            features, reference = None, None
            if self.extractor is not None:
                local_idx, local_feat = [], []
                for chunk in chunks:
                    batch = to_chw_batch([load_rgb(images_dir / self.samples[k].file_name) for k in chunk])
                    local_idx.extend(chunk)
                    local_feat.append(self.extractor.extract(batch).numpy())
                width = self.extractor.feature_dim
                _, features = gather_rows(np.asarray(local_idx, np.int64),
                                          np.concatenate(local_feat) if local_feat else np.zeros((0, width)))
                reference = self._reference_stats()
        distributed.barrier()
        if not distributed.is_rank0():
            return {}, None
        scalars = {}
        if reference is not None:
            scalars[f"eval/fid_{self.extractor.name}"] = fid_score(features, self.extractor, reference)
        return scalars, captioned_grid([images_dir / s.file_name for s in self.samples], [s.prompt.text for s in self.samples])


def _prompt_ids_only(text: str) -> list[int]:
    raise RuntimeError(f"training-data prompt {text!r} has no token ids; the MDS sample should carry them")
