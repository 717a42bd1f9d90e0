"""Writing one part: the models that turn records into samples, and the MDS writer of a part."""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from streaming import MDSWriter

from arra_ds.data.features import FeatureEncoder, load_encoder
from arra_ds.data.pretokenize.config import PART_DONE_FILE, PretokenizeConfig, PretokenizeError
from arra_ds.data.schema import columns_for
from arra_ds.distributed import compute_dtype
from arra_ds.io import atomic_write_json
from arra_ds.tokens.conversation import ConversationTokenizer, TokenizedConversation, load_text_tokenizer
from arra_ds.tokens.layout import image_to_tokens
from arra_ds.tokens.vocab import ChameleonVocab
from arra_ds.tokens.vqgan import VQGAN


@dataclass
class Models:
    vqgan: VQGAN
    encoders: dict[str, FeatureEncoder]
    vocab: ChameleonVocab
    conversation_tokenizer: ConversationTokenizer


def load_models(cfg: PretokenizeConfig, device: torch.device) -> Models:
    dtype = compute_dtype(cfg.dtype, device)
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

    def __init__(self, out_dir: Path, part: int, cfg: PretokenizeConfig, models: Models):
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
        atomic_write_json(self.tmp_dir / PART_DONE_FILE, summary)
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.tmp_dir.rename(self.final_dir)
        return summary
