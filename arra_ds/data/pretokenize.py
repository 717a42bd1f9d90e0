"""Pre-tokenization: conversation JSON -> MDS shards with tokens and encoder features together.

    cfg = PretokenizeConfig(input="train.json", out_dir="mds/train", tokenizer=".../text_tokenizer.json",
                            vqgan_yaml=".../vqgan.yaml", vqgan_ckpt=".../vqgan.ckpt",
                            encoders=[parse_encoder_arg("biomedclip=/models/biomedclip")])
    summary = run_pretokenize(cfg)

Input: the ARRA / Lumina-mGPT JSON list (``{"conversations": [{"from": "human", "value": prompt},
{"from": "gpt", "value": "<|image|>"}], "image": [path]}``). Output: ``out_dir/part-NNNNN/`` MDS
directories (columns of ``arra_ds.data.schema``), one merged ``out_dir/index.json`` (streaming's
``merge_index``) and ``out_dir/report.json`` listing every skipped item with its reason.

How the work is split:
- The items are cut into parts of ``items_per_part`` consecutive items. A part is the unit of
  resumption: it is written to ``part-NNNNN.tmp`` and renamed to ``part-NNNNN`` only when complete,
  so a rerun skips finished parts and redoes the one that was interrupted.
- Process ``rank`` of ``world_size`` takes parts rank, rank + world_size, ... (disjoint shard sets).
  ``num_procs`` spawns the processes locally (one per GPU, or several CPU processes); an external
  launcher can set ``rank`` / ``world_size`` instead and run once more without them to merge.
- In each process a DataLoader with ``num_workers`` workers opens, checks, crops and preprocesses
  images (VQGAN input and every encoder's input) and tokenises the text; the main process groups
  items by crop size and runs the VQGAN and the encoders on batches of ``batch_size``.

A bad item (missing or unreadable image, ``<|image|>`` count not equal to the image list, empty
text, image smaller than ``min_image_size``, sequence longer than ``max_seq_len``, a conversation
that is not one prompt + one image) is skipped, listed in the report with its reason and counted in
the summary; it never stops the job. The output does not depend on ``num_workers`` or the number
of processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from arra_ds.data.features import EncoderSpec, FeatureEncoder, load_encoder
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.data.schema import columns_for
from arra_ds.data.sequence import (
    ASSISTANT_ROLES,
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    ConversationError,
    ConversationTokenizer,
    TokenizedConversation,
    image_to_tokens,
    load_text_tokenizer,
)
from arra_ds.model.vocab import ChameleonVocab
from arra_ds.model.vqgan import VQGAN

PART_DONE_FILE = "part.json"
META_FILE = "pretokenize_meta.json"
REPORT_FILE = "report.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PretokenizeError(RuntimeError):
    """A run that cannot start or finish (bad settings, a changed input); not raised for bad items."""


@dataclass
class PretokenizeConfig:
    input: str = ""  # conversation JSON (a list of items)
    out_dir: str = ""
    tokenizer: str = ""  # Chameleon text_tokenizer.json (a `tokenizers` JSON)
    vqgan_yaml: str = ""  # original Chameleon tokenizer: vqgan.yaml + vqgan.ckpt ...
    vqgan_ckpt: str = ""
    vqgan_hf: str = ""  # ... or a Hugging Face Chameleon checkpoint dir (model.vqmodel.*)
    encoders: list[EncoderSpec] = field(default_factory=list)
    image: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    image_root: str = ""  # relative image paths are relative to this ("" = the JSON file's directory)
    min_image_size: int = 64  # images whose shorter side is below this are skipped
    max_seq_len: int = 0  # > 0: samples with more tokens are skipped
    batch_size: int = 16  # images per VQGAN / encoder forward pass
    num_workers: int = 4  # DataLoader workers per process (image decoding and preprocessing)
    num_procs: int = 1  # local processes, each with its own parts (one per GPU, or CPU processes)
    rank: int = 0  # this process's index when an external launcher starts the processes
    world_size: int = 1
    items_per_part: int = 2048  # resume unit; each part is one MDS directory
    shard_size_limit: int = 1 << 26  # bytes per MDS shard
    device: str = "auto"  # auto: cuda:<rank % gpus> when CUDA is available, else cpu
    dtype: Literal["fp32", "bf16"] = "fp32"  # VQGAN and encoder weights (bf16 only on CUDA)
    channels_last: bool = False  # NHWC VQGAN convs: ~2x faster; codes may differ at exact distance ties
    progress: bool = True

    def validate(self) -> None:
        from arra_ds.config import ConfigError

        if not self.input or not Path(self.input).is_file():
            raise ConfigError(f"input={self.input!r}: the conversation JSON file does not exist")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: set the output directory for the MDS shards")
        if not self.tokenizer or not Path(self.tokenizer).is_file():
            raise ConfigError(f"tokenizer={self.tokenizer!r}: pass the local text_tokenizer.json of the checkpoint")
        original = bool(self.vqgan_yaml or self.vqgan_ckpt)
        if original == bool(self.vqgan_hf):
            raise ConfigError("set either vqgan_yaml + vqgan_ckpt (original Chameleon tokenizer) or vqgan_hf (HF checkpoint dir)")
        if original and not (self.vqgan_yaml and self.vqgan_ckpt):
            raise ConfigError("vqgan_yaml and vqgan_ckpt go together (Chameleon's tokenizer/vqgan.yaml + vqgan.ckpt)")
        self.image.validate()
        for spec in self.encoders:
            spec.validate()
        names = [s.name for s in self.encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"encoders {names}: each feature column feat_<name> may appear once")
        if min(self.batch_size, self.items_per_part, self.num_procs, self.world_size, self.shard_size_limit) < 1:
            raise ConfigError("batch_size, items_per_part, num_procs, world_size and shard_size_limit must be >= 1")
        if self.num_workers < 0 or self.min_image_size < 0 or self.max_seq_len < 0:
            raise ConfigError("num_workers, min_image_size and max_seq_len must be >= 0")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        if self.num_procs > 1 and self.world_size > 1:
            raise ConfigError("use num_procs (local spawn) or rank/world_size (external launcher), not both")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; use one of {sorted(DTYPES)}")

    def content_key(self) -> dict:
        """Settings that change the written samples; a resumed run must use the same ones."""
        stat = Path(self.input).stat()
        return {
            "input": str(Path(self.input).resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "tokenizer": str(Path(self.tokenizer).resolve()),
            "vqgan": [str(Path(p).resolve()) if p else "" for p in (self.vqgan_yaml, self.vqgan_ckpt, self.vqgan_hf)],
            "encoders": [asdict(s) for s in self.encoders],
            "image": asdict(self.image),
            "image_root": self.image_root,
            "min_image_size": self.min_image_size,
            "max_seq_len": self.max_seq_len,
            "items_per_part": self.items_per_part,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
        }


# ------------------------------------------------------------------------------------------------
# Items: checks, image loading and preprocessing (runs in DataLoader workers)
# ------------------------------------------------------------------------------------------------


class BadItem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def item_uid(item: Any, index: int) -> str:
    """The item's "uid" / "id" if it has one, else its image path as written in the JSON."""
    if isinstance(item, dict):
        for key in ("uid", "id"):
            if item.get(key) not in (None, ""):
                return str(item[key])
        images = item.get("image")
        if isinstance(images, list) and images:
            return str(images[0])
        if isinstance(images, str) and images:
            return images
    return f"item-{index}"


def parse_item(item: Any) -> tuple[str, str, list[str]]:
    """-> (prompt, answer text with the placeholder, image paths); raises BadItem."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise BadItem("bad_format", "item is not an object with a 'conversations' list")
    turns = item["conversations"]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and "from" in t for t in turns):
        raise BadItem("bad_format", "every turn needs 'from' and a string 'value'")
    roles = [str(t["from"]).lower() for t in turns]
    if len(turns) != 2 or roles[0] not in HUMAN_ROLES or roles[1] not in ASSISTANT_ROLES:
        raise BadItem("unsupported_conversation", f"turns {roles}: expected one human prompt and one gpt answer")
    prompt, answer = turns[0]["value"], turns[1]["value"]
    if not prompt.strip():
        raise BadItem("empty_text", "the human prompt is empty")
    images = item.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadItem("bad_format", "'image' must be a path or a list of paths")
    placeholders = prompt.count(IMAGE_PLACEHOLDER) + answer.count(IMAGE_PLACEHOLDER)
    if placeholders != len(images):
        raise BadItem("placeholder_count", f"{placeholders} {IMAGE_PLACEHOLDER} in the text but {len(images)} images")
    if len(images) != 1 or IMAGE_PLACEHOLDER in prompt:
        raise BadItem("unsupported_conversation", "a sample must be one text prompt and one image in the answer")
    return prompt, answer, images


def open_image(path: Path, min_size: int) -> Image.Image:
    if not path.is_file():
        raise BadItem("missing_image", f"{path} does not exist")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.copy()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise BadItem("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None
    if min(image.size) < min_size:
        raise BadItem("image_too_small", f"{path} is {image.size[0]}x{image.size[1]}, shorter side < {min_size}")
    return image


class ItemDataset(Dataset):
    """(index, raw item) -> a checked, preprocessed record, or a bad-item record. Never raises."""

    def __init__(self, items: list[tuple[int, Any]], conversation_tokenizer: ConversationTokenizer,
                 vq_preprocess: VQImagePreprocessor, encoder_preprocess: dict, image_root: Path, min_image_size: int):
        self.items = items
        self.conversation_tokenizer = conversation_tokenizer
        self.vq_preprocess = vq_preprocess
        self.encoder_preprocess = encoder_preprocess
        self.image_root = image_root
        self.min_image_size = min_image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        index, item = self.items[position]
        record = {"index": index, "uid": item_uid(item, index)}
        try:
            prompt, answer, images = parse_item(item)
            record["image"] = images[0]
            tokenized = self.conversation_tokenizer.tokenize([("human", prompt), ("gpt", answer)])
            image = open_image(self.image_root / images[0], self.min_image_size)
            record.update(
                caption=prompt,
                text=tokenized,
                pixels=self.vq_preprocess(image),
                encoder_pixels={name: pre(image) for name, pre in self.encoder_preprocess.items()},
            )
        except BadItem as e:
            record.update(reason=e.reason, detail=e.detail)
        except ConversationError as e:
            record.update(reason="bad_text", detail=str(e))
        except Exception as e:  # a bad item must never stop the job; the report keeps the cause
            record.update(reason="error", detail=f"{type(e).__name__}: {e}")
        return record


def keep_records(records: list[dict]) -> list[dict]:
    """DataLoader collate_fn: a batch stays a list of records (tensors are stacked per crop size later)."""
    return records


# ------------------------------------------------------------------------------------------------
# Writing one part
# ------------------------------------------------------------------------------------------------


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of CPU tensors through numpy: a plain copy, without waking torch's thread pool."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def part_done(out_dir: Path, part: int) -> bool:
    return (out_dir / part_name(part) / PART_DONE_FILE).is_file()


class PartWriter:
    """Buckets records by crop size, runs the models per batch, writes one part's MDS directory.

    A part holds at most ``items_per_part`` samples in memory (a few KB each) so that it can write
    them in input order: the output is independent of batching, workers and processes.
    """

    def __init__(self, out_dir: Path, part: int, cfg: PretokenizeConfig, models: "Models"):
        from streaming import MDSWriter

        self.final_dir = out_dir / part_name(part)
        self.tmp_dir = out_dir / (part_name(part) + ".tmp")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # left over from an interrupted run
        self.part = part
        self.cfg = cfg
        self.models = models
        self.writer = MDSWriter(
            out=str(self.tmp_dir), columns=columns_for([s.name for s in cfg.encoders]),
            size_limit=cfg.shard_size_limit, progress_bar=False,
        )
        self.buckets: dict[tuple[int, int], list[dict]] = defaultdict(list)
        self.samples: dict[int, dict] = {}  # item index -> sample; written in input order at the end
        self.skipped: list[dict] = []

    def add(self, record: dict) -> None:
        if "reason" in record:
            self.skip(record, record["reason"], record["detail"])
            return
        key = tuple(record["pixels"].shape[1:])
        self.buckets[key].append(record)
        if len(self.buckets[key]) >= self.cfg.batch_size:
            self._flush(self.buckets.pop(key))

    def skip(self, record: dict, reason: str, detail: str) -> None:
        self.skipped.append(
            {"index": record["index"], "uid": record["uid"], "image": record.get("image"), "reason": reason, "detail": detail}
        )

    def _flush(self, records: list[dict]) -> None:
        codes = self.models.vqgan.encode(stack([r["pixels"] for r in records]))  # [B, h, w]
        features = {
            name: encoder.encode(stack([r["encoder_pixels"][name] for r in records]))  # [B, D] fp16
            for name, encoder in self.models.encoders.items()
        }
        vocab = self.models.vocab
        for i, record in enumerate(records):
            text: TokenizedConversation = record["text"]
            tokens, _ = text.with_images([image_to_tokens(codes[i].cpu(), vocab)])
            if self.cfg.max_seq_len and len(tokens) > self.cfg.max_seq_len:
                self.skip(record, "too_long", f"{len(tokens)} tokens > max_seq_len={self.cfg.max_seq_len}")
                continue
            sample = {
                "tokens": np.asarray(tokens, dtype=np.int32),
                "prompt_len": np.int32(text.prompt_len),
                "caption": record["caption"],
                "uid": record["uid"],
            }
            for name, values in features.items():
                sample[f"feat_{name}"] = values[i].numpy()
            self.samples[record["index"]] = sample

    def finish(self) -> dict:
        """Flush what is left, close the shards, mark the part done (atomically)."""
        for key in sorted(self.buckets):
            self._flush(self.buckets[key])
        self.buckets.clear()
        # Input order, whatever the crop-size buckets and batch boundaries were.
        for index in sorted(self.samples):
            self.writer.write(self.samples[index])
        self.writer.finish()
        summary = {"part": self.part, "written": len(self.samples), "skipped": sorted(self.skipped, key=lambda s: s["index"])}
        (self.tmp_dir / PART_DONE_FILE).write_text(json.dumps(summary, indent=1))
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.tmp_dir.rename(self.final_dir)
        return summary


# ------------------------------------------------------------------------------------------------
# One process
# ------------------------------------------------------------------------------------------------


@dataclass
class Models:
    vqgan: VQGAN
    encoders: dict[str, FeatureEncoder]
    vocab: ChameleonVocab
    conversation_tokenizer: ConversationTokenizer


def resolve_device(requested: str, rank: int) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_models(cfg: PretokenizeConfig, device: torch.device) -> Models:
    dtype = DTYPES[cfg.dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise PretokenizeError(f"dtype={cfg.dtype} needs a CUDA device (device is {device}); use fp32 on the CPU")
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source=cfg.tokenizer)
    vqgan = VQGAN.from_hf(cfg.vqgan_hf) if cfg.vqgan_hf else VQGAN.from_original(cfg.vqgan_yaml, cfg.vqgan_ckpt)
    if vqgan.num_codes > vocab.num_image_codes:
        raise PretokenizeError(
            f"the VQGAN has {vqgan.num_codes} codes but {cfg.tokenizer} has only {vocab.num_image_codes} image "
            "code tokens (IMGIMG...); use the tokenizer that belongs to this VQGAN"
        )
    vqgan = vqgan.to(device=device, dtype=dtype)
    if cfg.channels_last:
        vqgan.use_channels_last()
    encoders = {spec.name: load_encoder(spec, device=device, dtype=dtype) for spec in cfg.encoders}
    return Models(vqgan, encoders, vocab, ConversationTokenizer(tokenizer, vocab))


def read_items(path: str | Path) -> list:
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretokenizeError(f"cannot read the conversation JSON {path}: {e}") from e
    if not isinstance(items, list):
        raise PretokenizeError(f"{path} must hold a JSON list of items, got {type(items).__name__}")
    return items


def run_rank(cfg: PretokenizeConfig, rank: int, world_size: int, show_progress: bool) -> int:
    """Write this rank's unfinished parts; returns how many items it processed."""
    out_dir = Path(cfg.out_dir)
    items = read_items(cfg.input)
    num_parts = max(1, math.ceil(len(items) / cfg.items_per_part))
    todo = [p for p in range(rank, num_parts, world_size) if not part_done(out_dir, p)]
    if not todo:
        return 0
    device = resolve_device(cfg.device, rank)
    models = load_models(cfg, device)
    image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.input).resolve().parent
    selected = [
        (i, items[i]) for p in todo for i in range(p * cfg.items_per_part, min(len(items), (p + 1) * cfg.items_per_part))
    ]
    dataset = ItemDataset(
        selected, models.conversation_tokenizer, VQImagePreprocessor(cfg.image),
        {name: enc.preprocess for name, enc in models.encoders.items()}, image_root, cfg.min_image_size,
    )
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=keep_records)
    bar = tqdm(total=len(selected), desc=f"pretokenize rank {rank}", unit="img", disable=not show_progress)
    writer: PartWriter | None = None
    with torch.no_grad():
        for records in loader:
            for record in records:
                part = record["index"] // cfg.items_per_part
                if writer is None or writer.part != part:
                    if writer is not None:
                        writer.finish()
                    writer = PartWriter(out_dir, part, cfg, models)
                writer.add(record)
                bar.update(1)
        if writer is not None:
            writer.finish()
    bar.close()
    # Parts with no items (an empty JSON) still need a done marker so merging sees every part.
    for part in todo:
        if not part_done(out_dir, part):
            PartWriter(out_dir, part, cfg, models).finish()
    return len(selected)


def _spawned_rank(cfg: PretokenizeConfig, rank: int, world_size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    run_rank(cfg, rank, world_size, show_progress=cfg.progress and rank == 0)


# ------------------------------------------------------------------------------------------------
# Whole run: meta check, processes, merge, report
# ------------------------------------------------------------------------------------------------


def _check_meta(cfg: PretokenizeConfig) -> None:
    """Record the content settings on the first run; refuse to resume with different ones."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cfg.content_key()
    meta_path = out_dir / META_FILE
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        changed = sorted(k for k in set(key) | set(previous) if key.get(k) != previous.get(k))
        if changed:
            raise PretokenizeError(
                f"{out_dir} was written with different settings ({', '.join(changed)} changed); resuming would mix "
                "them. Use a new out_dir, or delete this one to start over."
            )
        return
    tmp = meta_path.with_suffix(f".tmp{os.getpid()}")  # ranks started together may all get here
    tmp.write_text(json.dumps(key, indent=1))
    tmp.replace(meta_path)


def merge_parts(cfg: PretokenizeConfig, num_items: int, num_parts: int) -> dict:
    """One index.json over all parts (streaming's merge_index) and the report; returns the summary."""
    from streaming.base.util import merge_index

    out_dir = Path(cfg.out_dir)
    parts = [json.loads((out_dir / part_name(p) / PART_DONE_FILE).read_text()) for p in range(num_parts)]
    written = sum(p["written"] for p in parts)
    skipped = [s for p in parts for s in p["skipped"]]
    summary = {
        "input": cfg.input,
        "out_dir": cfg.out_dir,
        "items": num_items,
        "written": written,
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "parts": num_parts,
        "columns": columns_for([s.name for s in cfg.encoders]),
        "bad_items": skipped,
    }
    report = out_dir / REPORT_FILE
    report.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
    report.with_suffix(".tmp").replace(report)
    if written == 0:
        raise PretokenizeError(f"no sample was written: all {num_items} items were skipped; see {report}")
    index = out_dir / "index.json"
    index.unlink(missing_ok=True)
    logging.disable(logging.WARNING)  # merge_index warns about its temp dir and the existing out dir
    try:
        merge_index([str(out_dir / part_name(p) / "index.json") for p in range(num_parts) if parts[p]["written"]], str(out_dir))
    finally:
        logging.disable(logging.NOTSET)
    return summary


def format_summary(summary: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    return (
        f"pre-tokenised {summary['items']} items into {summary['out_dir']}: {summary['written']} samples written, "
        f"{summary['skipped']} skipped ({reasons}); report: {Path(summary['out_dir']) / REPORT_FILE}"
    )


def run_pretokenize(cfg: PretokenizeConfig) -> dict | None:
    """Run (or resume) pre-tokenization. Returns the summary once every part is done, else None.

    With ``world_size > 1`` (external launcher) each call writes its own parts only; run once more
    with ``world_size=1`` (nothing left to do but merging) to get index.json and the report.
    """
    cfg.validate()
    _check_meta(cfg)
    items = read_items(cfg.input)
    num_parts = max(1, math.ceil(len(items) / cfg.items_per_part))
    out_dir = Path(cfg.out_dir)
    if cfg.num_procs > 1:
        # fork starts children without re-importing torch & co.; it is safe because this parent has
        # not touched CUDA or run a torch op. Each child loads its own models (and its own GPU).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
        context = multiprocessing.get_context(method)
        threads = max(1, (os.cpu_count() or 1) // cfg.num_procs)
        procs = [context.Process(target=_spawned_rank, args=(cfg, r, cfg.num_procs, threads)) for r in range(cfg.num_procs)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            raise PretokenizeError(f"pre-tokenization processes {failed} failed (see their errors above); rerun to resume")
    else:
        run_rank(cfg, cfg.rank, cfg.world_size, show_progress=cfg.progress and cfg.rank == 0)
    missing = [p for p in range(num_parts) if not part_done(out_dir, p)]
    if missing:
        if cfg.world_size > 1:
            return None  # other ranks are still writing theirs
        raise PretokenizeError(f"parts {missing[:10]} of {out_dir} are not done; rerun to resume")
    return merge_parts(cfg, len(items), num_parts)
