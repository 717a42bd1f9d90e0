"""The generation engine: prompts or class labels -> PNG files on one or many ranks, resumable, for any backbone.
Used by ``launch/generate.py``, the evaluation (``launch/eval.py``) and the in-training evaluation.

    torchrun --nproc_per_node=N launch/generate.py model=<run | checkpoint | model> prompts=prompts.txt output_dir=out
    torchrun --nproc_per_node=N launch/generate.py model=runs/llamagen classes=[1,207,360] samples_per_prompt=4

Sample k is prompt k // S, replica k % S (S = ``samples_per_prompt``; a prompt is a text or a class label),
seeded with ``seed_for_sample(sampling.seed, k)`` and written to ``<output_dir>/images/<k:06d>.png``.
Generation batches are the chunks ``[c * batch_size, (c + 1) * batch_size)`` of sample indices and chunk c runs
on rank c % world: a sample is generated in the same batch with the same seed whatever the number of ranks,
and each image is decoded alone, so 1 rank and 8 ranks write the same files. Existing PNGs (written
atomically) are kept; only missing ones are generated. ``generation.json`` (model, sampling, decoder, batch size)
and ``samples.jsonl`` (prompt and seed of every sample) are written before the first image: a PNG made with other
settings or for another prompt is made again, never passed off as the new one.

What the user leaves out comes from the model's data record (``arra_ds.checkpoints.read_run_data``): the image
tokenizer the data was pre-tokenised with (checked against the run's record of it when it lives outside the
run), and the size it was trained at (``sampling.height`` / ``width`` = 0). Another size is allowed where the
backbone can draw it, with one warning line: the model has never drawn it.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import RUN_DATA_FILE, RunData, check_external_file, read_run_assets, read_run_data
from arra_ds.data.images import pixels_to_uint8
from arra_ds.distributed import compute_dtype, init_process_group, my_chunks, sum_over_ranks
from arra_ds.errors import ConfigError
from arra_ds.generate.images import save_png
from arra_ds.generate.loading import ModelRef, load_for_generation, resolve_model
from arra_ds.generate.prompts import Prompt, PromptSet, load_prompts, prompts_from_classes, prompts_from_texts
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig, seed_for_sample
from arra_ds.io import atomic_write, atomic_write_json, read_jsonl
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import ImageDecoder

MANIFEST_FILE = "samples.jsonl"
SETTINGS_FILE = "generation.json"
IMAGE_NAME = re.compile(r"^\d{6}\.png$")  # SampleSpec.file_name


@dataclass
class SampleSpec:
    index: int  # global sample index k
    prompt: Prompt
    replica: int
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:06d}.png"

    def manifest_entry(self) -> dict:
        entry = {
            "index": self.index, "prompt_index": self.prompt.index, "replica": self.replica, "seed": self.seed,
            "uid": self.prompt.uid, "prompt": self.prompt.text, "file": f"images/{self.file_name}",
        }
        if self.prompt.is_class:
            entry["class_id"] = self.prompt.class_id
        return entry


def build_samples(prompt_set: PromptSet, samples_per_prompt: int, base_seed: int) -> list[SampleSpec]:
    samples = []
    for p in prompt_set.prompts:
        for r in range(samples_per_prompt):
            k = p.index * samples_per_prompt + r
            samples.append(SampleSpec(k, p, r, seed_for_sample(base_seed, k)))
    return samples


def write_manifest(samples: list[SampleSpec], path: Path) -> None:
    atomic_write(path, "".join(json.dumps(s.manifest_entry()) + "\n" for s in samples))


# ---- the config and its resolution -------------------------------------------------------------


@dataclass
class GenerateConfig:
    # a trainer checkpoint (run dir / checkpoints / step dir), a Hugging Face Chameleon directory (Lumina-mGPT,
    # an export) or a released LlamaGen c2i .pt
    model: str = ""
    # the model section of a model that is not a trainer checkpoint, for what its files do not say (a LlamaGen
    # .pt: backbone.llamagen.size=B ...); a trainer checkpoint has its own
    backbone: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str = ""  # prompt tokenizer JSON; default: the model's
    # the image tokenizer that decodes the codes: Chameleon vqgan.yaml + vqgan.ckpt, or LlamaGen's VQ checkpoint
    # (vq_ds16_c2i.pt; its config a yaml of LlamaGenVQConfig fields, default VQ-16); default: the run's data record's
    vqgan_config: str = ""
    vqgan_checkpoint: str = ""
    prompts: str = ""  # .txt (one per line), conversation .json or MDS directory (class-to-image MDS: its labels)
    prompt_texts: list[str] = field(default_factory=list)  # prompts given directly (used when prompts is empty)
    classes: list[int] = field(default_factory=list)  # class labels to draw (class-conditional models); [] = all
    num_prompts: int = 0  # first n prompts (or classes); 0 = all
    samples_per_prompt: int = 1  # per text prompt or class label
    batch_size: int = 8
    output_dir: str = "runs/generate"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    progress_bar: bool = True

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model=<trainer checkpoint, Hugging Face Chameleon dir or LlamaGen .pt> is required")
        if sum(map(bool, (self.prompts, self.prompt_texts, self.classes))) > 1:
            raise ConfigError("give one of prompts=<file or MDS dir>, prompt_texts=[...] (or --prompt) and classes=[...]")
        if self.samples_per_prompt < 1 or self.batch_size < 1 or self.num_prompts < 0:
            raise ConfigError("samples_per_prompt and batch_size must be >= 1, num_prompts >= 0")
        if any(c < 0 for c in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes={self.classes} must be distinct class ids >= 0")
        self.sampling.validate()


@dataclass
class ResolvedGeneration:
    """A generation (or evaluation) config with every default filled in, and what it was resolved from. Nothing
    changes it after ``resolve_generation``."""

    cfg: GenerateConfig  # (an EvalConfig for evaluation) with the image tokenizer, sampling size and defaults set
    ref: ModelRef
    data: RunData | None  # the model's data record, if it has one
    grid: tuple[int, int]  # the code grid sampled (h, w)

    @property
    def backbone(self):
        return self.ref.backbone


def _decoder_files(cfg: GenerateConfig, data: RunData | None) -> tuple[str, str]:
    """(config, checkpoint) of the image tokenizer: the keys when given, else the data record's; a checkpoint the run
    recorded outside itself (too large to copy) must still be the file it saw."""
    if cfg.vqgan_config or cfg.vqgan_checkpoint or data is None:
        return cfg.vqgan_config, cfg.vqgan_checkpoint
    checkpoint = data.vqgan_checkpoint
    assets = read_run_assets(cfg.model)
    external = assets.external_file("vqgan_checkpoint") if assets is not None else None
    if external is not None and checkpoint:
        checkpoint = str(check_external_file(external))
    return data.vqgan_config, checkpoint


def resolve_generation(cfg: GenerateConfig) -> ResolvedGeneration:
    """Fill what ``cfg`` (a GenerateConfig or EvalConfig) leaves out: the image tokenizer and the trained size from
    the model's data record, the sampling settings from the backbone's defaults. Warns (one line, rank 0) when
    asked for a size the model was not trained at. Returns a new config; ``cfg`` is left as it was."""
    cfg.validate()
    ref = resolve_model(cfg.model, cfg.backbone)
    backbone = ref.backbone
    data = read_run_data(cfg.model)
    vqgan_config, vqgan_checkpoint = _decoder_files(cfg, data)
    sampling = cfg.sampling.with_defaults(backbone.sampling_defaults)
    trained = data.grid if data is not None else None
    if trained is not None:
        trained_px = (trained.code_height * backbone.code_patch_px, trained.code_width * backbone.code_patch_px)
        sampling = sampling.with_default_size(*trained_px)
        if (sampling.height, sampling.width) != trained_px:
            distributed.print0(
                f"warning: sampling {sampling.height}x{sampling.width} px, but {cfg.model} was trained on "
                f"{trained_px[0]}x{trained_px[1]} px ({trained.code_height}x{trained.code_width} codes) images: it has "
                f"never drawn this size (leave sampling.height / width out for the trained size)",
                file=sys.stderr,
            )
    grid = backbone.sampling_grid(ref.model_cfg, sampling.height, sampling.width)
    sampling = replace(sampling, height=grid[0] * backbone.code_patch_px, width=grid[1] * backbone.code_patch_px)
    if backbone.condition == "text" and cfg.classes:
        raise ConfigError(f"classes={cfg.classes}: {cfg.model} draws for text prompts (model.source={backbone.name}); "
                          "give prompts=<file> or --prompt")
    if backbone.condition == "class" and (cfg.prompt_texts or (cfg.prompts and not Path(cfg.prompts).is_dir())):
        raise ConfigError(f"{cfg.model} draws for class labels (model.source={backbone.name}): give classes=[...] or a "
                          "class-to-image MDS directory as prompts=, not text prompts")
    resolved = replace(cfg, vqgan_config=vqgan_config, vqgan_checkpoint=vqgan_checkpoint, sampling=sampling)
    return ResolvedGeneration(resolved, ref, data, grid)


def prompt_set_of(resolved: ResolvedGeneration) -> PromptSet:
    """The prompts (texts or class labels) of a resolved generation."""
    cfg, ref = resolved.cfg, resolved.ref
    if cfg.prompts:
        return load_prompts(cfg.prompts, ref.vocab(), cfg.num_prompts)
    if cfg.prompt_texts:
        return prompts_from_texts(cfg.prompt_texts)
    if ref.backbone.condition == "class":
        num_classes = ref.backbone.num_classes(ref.model_cfg)
        classes = cfg.classes or list(range(num_classes))
        if max(classes) >= num_classes:
            raise ConfigError(f"classes={cfg.classes}: the model has {num_classes} classes (ids 0..{num_classes - 1})")
        return prompts_from_classes(classes[: cfg.num_prompts] if cfg.num_prompts else classes)
    raise ConfigError("give the prompts: prompts=<.txt | conversation .json | MDS dir> or --prompt \"...\"")


# ---- output directory: settings, manifest, stale images --------------------------------------------


def generation_settings(resolved: ResolvedGeneration) -> dict:
    """What makes an image besides its prompt and seed."""
    cfg = resolved.cfg
    settings = {
        "model": resolved.ref.description, "precision": cfg.precision, "tokenizer": cfg.tokenizer,
        "vqgan_config": cfg.vqgan_config, "vqgan_checkpoint": cfg.vqgan_checkpoint, "batch_size": cfg.batch_size,
        "sampling": cfg.sampling.as_dict(),
    }
    return json.loads(json.dumps(settings))  # as read back from the file


def discard_stale_images(resolved: ResolvedGeneration, samples: list[SampleSpec], out_dir: Path) -> int:
    """Rank 0, before generating: delete the PNGs in ``out_dir/images`` that were made with other
    settings or for another sample, then record the settings and the samples; returns how many went."""
    images_dir = out_dir / "images"
    settings = generation_settings(resolved)
    settings_path, manifest_path = out_dir / SETTINGS_FILE, out_dir / MANIFEST_FILE
    same_settings = settings_path.is_file() and json.loads(settings_path.read_text()) == settings
    previous = {}
    if same_settings and manifest_path.is_file():
        previous = {entry["index"]: entry for entry in read_jsonl(manifest_path)}
    wanted = {s.file_name: s.manifest_entry() for s in samples}
    removed = 0
    for path in sorted(images_dir.glob("*.png")):
        if not IMAGE_NAME.match(path.name):
            continue
        entry = wanted.get(path.name)
        if entry is None or previous.get(entry["index"]) != entry:
            path.unlink()
            removed += 1
    atomic_write_json(settings_path, settings)
    write_manifest(samples, manifest_path)
    if removed:
        print(f"{removed} image(s) in {images_dir} were made with other settings or prompts: they are made again", flush=True)
    return removed


def prepare_output_dir(resolved: ResolvedGeneration, samples: list[SampleSpec], out_dir: Path) -> None:
    """Every rank: the images directory exists and holds no stale image (rank 0 checks)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if distributed.is_rank0():
        discard_stale_images(resolved, samples, out_dir)
    distributed.barrier()


# ---- generating ---------------------------------------------------------------------------------


def load_decoder(resolved: ResolvedGeneration, device) -> ImageDecoder:
    cfg = resolved.cfg
    return resolved.backbone.load_decoder(cfg.vqgan_config, cfg.vqgan_checkpoint).to(device)


@torch.inference_mode()
def decode_to_uint8(decoder: ImageDecoder, codes: torch.Tensor) -> np.ndarray:
    """codes [h, w] -> uint8 [H, W, 3]; one image per call so pixels never depend on batch mates."""
    return pixels_to_uint8(decoder.decode(codes[None]))[0]


def condition_of(prompt: Prompt, encode_prompt: Callable[[str], list[int]]):
    """What the stepper takes: a class id, or the prompt's token ids (the training ids of an MDS prompt)."""
    if prompt.is_class:
        return prompt.class_id
    return prompt.prompt_ids if prompt.prompt_ids is not None else encode_prompt(prompt.text)


def generate_missing(
    sampler: Sampler,
    decoder: ImageDecoder,
    encode_prompt: Callable[[str], list[int]],
    samples: list[SampleSpec],
    chunks: list[range],
    images_dir: Path,
    progress: bool,
) -> tuple[int, int]:
    """Generate and write the samples of ``chunks`` whose PNG is missing; returns (generated, reused)."""
    generated = reused = 0
    conditions: dict[int, object] = {}
    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, disable=not (progress and distributed.is_rank0()), desc="generate", dynamic_ncols=True)
    for chunk in chunks:
        specs = [samples[k] for k in chunk]
        todo = [s for s in specs if not (images_dir / s.file_name).is_file()]
        reused += len(specs) - len(todo)
        if todo:
            for s in specs:
                if s.prompt.index not in conditions:
                    conditions[s.prompt.index] = condition_of(s.prompt, encode_prompt)
            # Pad to the longest prompt of the whole chunk, not only of the missing rows, so a
            # resumed batch has the shapes of the original one.
            pad_to = max(sampler.prefix_length(conditions[s.prompt.index]) for s in specs)
            batch = sampler.generate([conditions[s.prompt.index] for s in todo], [s.seed for s in todo], pad_to=pad_to)
            for spec, codes in zip(todo, batch.codes):
                save_png(decode_to_uint8(decoder, codes), images_dir / spec.file_name)
            generated += len(todo)
        bar.update(len(specs))
    bar.close()
    return generated, reused


def release_memory() -> None:
    """Free what generation held before the next stage (feature extraction) needs the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_missing_images(resolved: ResolvedGeneration, samples: list[SampleSpec], chunks, images_dir: Path,
                            device) -> tuple[int, int]:
    """This rank's missing images: (generated, kept). Loads model and decoder only when one is missing; the
    model is freed before returning, so evaluation can use the memory next."""
    if all((images_dir / samples[k].file_name).is_file() for chunk in chunks for k in chunk):
        return 0, sum(len(chunk) for chunk in chunks)
    cfg = resolved.cfg
    model = load_for_generation(resolved.ref, compute_dtype(cfg.precision, device), device, cfg.tokenizer)
    decoder = load_decoder(resolved, device)
    rep_token = resolved.data is not None and resolved.data.rep_token
    sampler = Sampler(model.backbone, model.module, model.vocab, cfg.sampling, resolved.grid, rep_token)
    counts = generate_missing(sampler, decoder, model.encode_prompt, samples, chunks, images_dir, cfg.progress_bar)
    del model, sampler, decoder
    release_memory()
    return counts


def check_decoder_files(resolved: ResolvedGeneration) -> None:
    """The image tokenizer is known (or generation would fail after the model is loaded)."""
    cfg = resolved.cfg
    if not cfg.vqgan_checkpoint:
        raise ConfigError(
            f"vqgan_checkpoint= (and vqgan_config=) is required: the decoder of the image codes; {cfg.model} has no "
            f"data record ({RUN_DATA_FILE}) that names the image tokenizer its data was tokenised with"
        )
    for key in ("vqgan_config", "vqgan_checkpoint"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}={path} does not exist")


def run_generate(cfg: GenerateConfig) -> dict:
    """Write the PNGs (and ``samples.jsonl``); returns a summary (on every rank)."""
    resolved = resolve_generation(cfg)
    check_decoder_files(resolved)
    device = init_process_group()
    out_dir = Path(resolved.cfg.output_dir)
    images_dir = out_dir / "images"
    samples = build_samples(prompt_set_of(resolved), resolved.cfg.samples_per_prompt, resolved.cfg.sampling.seed)
    prepare_output_dir(resolved, samples, out_dir)
    chunks = my_chunks(len(samples), resolved.cfg.batch_size)
    generated, reused = generate_missing_images(resolved, samples, chunks, images_dir, device)
    distributed.barrier()
    generated, reused = sum_over_ranks([generated, reused])
    if distributed.is_rank0():
        sampling = resolved.cfg.sampling
        print(f"generated {generated} image(s) of {sampling.height}x{sampling.width} px, kept {reused} existing, "
              f"in {images_dir}", flush=True)
    return {"generated": generated, "reused": reused, "images_dir": str(images_dir), "num_samples": len(samples)}
