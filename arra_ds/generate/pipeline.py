"""Prompts -> PNG files on one or many ranks, resumable; used by ``launch/generate.py`` and the eval.

    torchrun --nproc_per_node=N launch/generate.py model=<ckpt or HF dir> prompts=prompts.txt \
        vqgan_config=vqgan.yaml vqgan_checkpoint=vqgan.ckpt output_dir=out

Sample k is prompt k // S, replica k % S (S = ``samples_per_prompt``), seeded with
``seed_for_sample(sampling.seed, k)`` and written to ``<output_dir>/images/<k:06d>.png``.
Generation batches are the chunks ``[c * batch_size, (c + 1) * batch_size)`` of sample indices and
chunk c runs on rank c % world: a sample is generated in the same batch with the same seed whatever
the number of ranks, and each image is decoded alone, so 1 rank and 8 ranks write the same files.
Existing PNGs (written atomically) are kept; only missing ones are generated. ``generation.json``
(model, sampling, decoder, batch size) and ``samples.jsonl`` (prompt and seed of every sample) are
written before the first image: a PNG made with other settings or for another prompt is made again,
never passed off as the new one.

What the user leaves out comes from the model's data record (``arra_ds.checkpoints.read_run_data``):
the VQGAN files the data was pre-tokenised with, and the size it was trained at (``sampling.height``
/ ``width`` = 0). Another size is allowed, with one warning line: the model has never drawn it.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import RUN_DATA_FILE, RunData, read_run_data
from arra_ds.data.images import pixels_to_uint8
from arra_ds.distributed import compute_dtype, init_process_group, my_chunks, sum_over_ranks
from arra_ds.errors import ConfigError
from arra_ds.generate.images import save_png
from arra_ds.generate.loading import describe_model, load_for_generation, load_vocab
from arra_ds.generate.prompts import Prompt, PromptSet, load_prompts, prompts_from_texts
from arra_ds.generate.sampler import ImageSampler
from arra_ds.generate.sampling import SamplingConfig, seed_for_sample
from arra_ds.io import atomic_write, atomic_write_json, read_jsonl
from arra_ds.tokens.layout import CODE_PATCH_PX
from arra_ds.tokens.vqgan import VQGAN


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
        return {
            "index": self.index, "prompt_index": self.prompt.index, "replica": self.replica, "seed": self.seed,
            "uid": self.prompt.uid, "prompt": self.prompt.text, "file": f"images/{self.file_name}",
        }


def build_samples(prompt_set: PromptSet, samples_per_prompt: int, base_seed: int) -> list[SampleSpec]:
    samples = []
    for p in prompt_set.prompts:
        for r in range(samples_per_prompt):
            k = p.index * samples_per_prompt + r
            samples.append(SampleSpec(k, p, r, seed_for_sample(base_seed, k)))
    return samples


def write_manifest(samples: list[SampleSpec], path: Path) -> None:
    atomic_write(path, "".join(json.dumps(s.manifest_entry()) + "\n" for s in samples))


MANIFEST_FILE = "samples.jsonl"
SETTINGS_FILE = "generation.json"
IMAGE_NAME = re.compile(r"^\d{6}\.png$")  # SampleSpec.file_name


def generation_settings(cfg) -> dict:
    """What makes an image besides its prompt and seed (``cfg``: a GenerateConfig or EvalConfig)."""
    settings = {
        "model": describe_model(cfg.model), "precision": cfg.precision, "tokenizer": cfg.tokenizer,
        "vqgan_config": cfg.vqgan_config, "vqgan_checkpoint": cfg.vqgan_checkpoint, "batch_size": cfg.batch_size,
        "sampling": cfg.sampling.as_dict(),
    }
    return json.loads(json.dumps(settings))  # as read back from the file


def discard_stale_images(cfg, samples: list[SampleSpec], out_dir: Path) -> int:
    """Rank 0, before generating: delete the PNGs in ``out_dir/images`` that were made with other
    settings or for another sample, then record the settings and the samples; returns how many went."""
    images_dir = out_dir / "images"
    settings = generation_settings(cfg)
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


def prepare_output_dir(cfg, samples: list[SampleSpec], out_dir: Path) -> None:
    """Every rank: the images directory exists and holds no stale image (rank 0 checks)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if distributed.is_rank0():
        discard_stale_images(cfg, samples, out_dir)
    distributed.barrier()


def apply_run_data(cfg) -> RunData | None:
    """Fill what ``cfg`` (a GenerateConfig or EvalConfig) leaves out from the model's data record:
    the VQGAN files and the trained size. Warns (one line, rank 0) when asked for another size."""
    data = read_run_data(cfg.model) if cfg.model else None
    if data is not None and not cfg.vqgan_config and not cfg.vqgan_checkpoint:
        cfg.vqgan_config, cfg.vqgan_checkpoint = data.vqgan_config, data.vqgan_checkpoint
    if data is None or not data.code_height:
        cfg.sampling = cfg.sampling.with_default_size(*cfg.sampling.pixel_size())
        return data
    trained = (data.height_px, data.width_px)
    cfg.sampling = cfg.sampling.with_default_size(*trained)
    if cfg.sampling.pixel_size() != trained:
        height, width = cfg.sampling.pixel_size()
        distributed.print0(
            f"warning: sampling {height}x{width} px ({height // CODE_PATCH_PX}x{width // CODE_PATCH_PX} codes), but "
            f"{cfg.model} was trained on {trained[0]}x{trained[1]} px ({data.code_height}x{data.code_width} codes) "
            f"images: it has never drawn this size (leave sampling.height / width out for the trained size)",
            file=sys.stderr,
        )
    return data


# ---- model pieces -------------------------------------------------------------------------------
def load_decoder(vqgan_config: str, vqgan_checkpoint: str, device: torch.device) -> VQGAN:
    return VQGAN.from_original(vqgan_config, vqgan_checkpoint).to(device).eval()


@torch.inference_mode()
def decode_to_uint8(decoder, codes: torch.Tensor) -> np.ndarray:
    """codes [h, w] -> uint8 [H, W, 3]; one image per call so pixels never depend on batch mates."""
    device = next(decoder.parameters()).device
    return pixels_to_uint8(decoder.decode(codes[None].to(device)))[0]


def generate_missing(
    sampler,
    decoder,
    encode_prompt: Callable[[str], list[int]],
    samples: list[SampleSpec],
    chunks: list[range],
    images_dir: Path,
    progress: bool,
) -> tuple[int, int]:
    """Generate and write the samples of ``chunks`` whose PNG is missing; returns (generated, reused)."""
    generated = reused = 0
    prompt_ids: dict[int, list[int]] = {}
    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, disable=not (progress and distributed.is_rank0()), desc="generate", dynamic_ncols=True)
    for chunk in chunks:
        specs = [samples[k] for k in chunk]
        todo = [s for s in specs if not (images_dir / s.file_name).is_file()]
        reused += len(specs) - len(todo)
        if todo:
            for s in specs:
                if s.prompt.index not in prompt_ids:
                    ids = s.prompt.prompt_ids if s.prompt.prompt_ids is not None else encode_prompt(s.prompt.text)
                    prompt_ids[s.prompt.index] = ids
            # Pad to the longest prompt of the whole chunk, not only of the missing rows, so a
            # resumed batch has the shapes of the original one.
            pad_to = max(sampler.prefix_length(prompt_ids[s.prompt.index]) for s in specs)
            batch = sampler.generate([prompt_ids[s.prompt.index] for s in todo], [s.seed for s in todo], pad_to=pad_to)
            for spec, codes in zip(todo, batch.codes):
                save_png(decode_to_uint8(decoder, codes), images_dir / spec.file_name)
            generated += len(todo)
        bar.update(len(specs))
    bar.close()
    return generated, reused


# ---- launch/generate.py -------------------------------------------------------------------------
def generate_missing_images(cfg, samples: list[SampleSpec], chunks, images_dir: Path, device) -> tuple[int, int]:
    """This rank's missing images: (generated, kept). Loads model and decoder only when one is missing.

    ``cfg`` is a GenerateConfig or an EvalConfig (model, precision, tokenizer, vqgan_*, sampling,
    progress_bar); the model is freed before returning, so evaluation can use the memory next.
    """
    if all((images_dir / samples[k].file_name).is_file() for chunk in chunks for k in chunk):
        return 0, sum(len(chunk) for chunk in chunks)
    model = load_for_generation(cfg.model, compute_dtype(cfg.precision, device), device, cfg.tokenizer)
    decoder = load_decoder(cfg.vqgan_config, cfg.vqgan_checkpoint, device)
    sampler = ImageSampler(model.backbone, model.vocab, cfg.sampling)
    counts = generate_missing(sampler, decoder, model.encode_prompt, samples, chunks, images_dir, cfg.progress_bar)
    del model, sampler, decoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


@dataclass
class GenerateConfig:
    model: str = ""  # trainer checkpoint (run dir / checkpoints / step dir) or HF model directory
    tokenizer: str = ""  # prompt tokenizer JSON; default: the model's
    vqgan_config: str = ""  # Chameleon vqgan.yaml
    vqgan_checkpoint: str = ""  # Chameleon vqgan.ckpt
    prompts: str = ""  # .txt (one per line), conversation .json or MDS directory
    prompt_texts: list[str] = field(default_factory=list)  # prompts given directly (used when prompts is empty)
    num_prompts: int = 0  # first n prompts; 0 = all
    samples_per_prompt: int = 1
    batch_size: int = 8
    output_dir: str = "runs/generate"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    progress_bar: bool = True

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model=<trainer checkpoint or HF model dir> is required")
        if bool(self.prompts) == bool(self.prompt_texts):
            raise ConfigError("give exactly one of prompts=<file or MDS dir> and prompt_texts=[...] (or --prompt)")
        if not self.vqgan_config or not self.vqgan_checkpoint:
            raise ConfigError(
                f"vqgan_config=<vqgan.yaml> and vqgan_checkpoint=<vqgan.ckpt> are required (the image decoder): "
                f"{self.model} has no data record ({RUN_DATA_FILE}) that names the VQGAN its data was tokenised with"
            )
        if self.samples_per_prompt < 1 or self.batch_size < 1 or self.num_prompts < 0:
            raise ConfigError("samples_per_prompt and batch_size must be >= 1, num_prompts >= 0")
        self.sampling.validate()


def run_generate(cfg: GenerateConfig) -> dict:
    """Write the PNGs (and ``samples.jsonl``); returns a summary (on every rank)."""
    cfg.sampling.validate()
    apply_run_data(cfg)
    cfg.validate()
    device = init_process_group()
    out_dir = Path(cfg.output_dir)
    images_dir = out_dir / "images"
    if cfg.prompts:
        prompt_set = load_prompts(cfg.prompts, load_vocab(cfg.model), cfg.num_prompts)
    else:
        prompt_set = prompts_from_texts(cfg.prompt_texts)
    samples = build_samples(prompt_set, cfg.samples_per_prompt, cfg.sampling.seed)
    prepare_output_dir(cfg, samples, out_dir)
    chunks = my_chunks(len(samples), cfg.batch_size)
    generated, reused = generate_missing_images(cfg, samples, chunks, images_dir, device)
    distributed.barrier()
    generated, reused = sum_over_ranks([generated, reused])
    if distributed.is_rank0():
        height, width = cfg.sampling.pixel_size()
        print(f"generated {generated} image(s) of {height}x{width} px, kept {reused} existing, in {images_dir}", flush=True)
    return {"generated": generated, "reused": reused, "images_dir": str(images_dir), "num_samples": len(samples)}
