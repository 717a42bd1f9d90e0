"""Writing one part: the MDS writer of a part, fed by a task's batched ``encode``."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch
from streaming import MDSWriter
from streaming.base.format.mds.encodings import get_mds_encoded_size, mds_encode

from arra_ds.data.features import FeatureEncoder
from arra_ds.data.pretokenize.config import PART_DONE_FILE, PretokenizeRunConfig
from arra_ds.data.pretokenize.items import BadItem
from arra_ds.io import atomic_write_json


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of CPU tensors through numpy: a plain copy, without waking torch's thread pool."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


# MDS shard layout (MDSWriter): sample count (uint32), one offset per sample and the end offset (uint32), the
# writer's config as JSON, then the samples, each a uint32 size per variable-size column and the column data.
MDS_COUNT_BYTES = MDS_OFFSET_BYTES = MDS_SIZE_BYTES = 4
MDS_FORMAT_VERSION = 2


def encoded_sample_bytes(columns: dict[str, str], sample: dict) -> int:
    """Bytes ``sample`` takes in an MDS shard written with ``columns``, its offset included."""
    data = sum(len(mds_encode(encoding, sample[name])) for name, encoding in columns.items())
    variable = sum(get_mds_encoded_size(encoding) is None for encoding in columns.values())
    return data + variable * MDS_SIZE_BYTES + MDS_OFFSET_BYTES


def mds_shard_header_bytes(columns: dict[str, str], size_limit: int) -> int:
    """Bytes of an MDS shard besides its samples (``MDSWriter.extra_bytes_per_shard``)."""
    names = sorted(columns)
    config = {
        "version": MDS_FORMAT_VERSION, "format": "mds", "compression": None, "hashes": [], "size_limit": size_limit,
        "column_names": names, "column_encodings": [columns[n] for n in names],
        "column_sizes": [get_mds_encoded_size(columns[n]) for n in names],
    }  # fmt: skip
    return MDS_COUNT_BYTES + MDS_OFFSET_BYTES + len(json.dumps(config, sort_keys=True).encode())


def estimated_part_bytes(sample_bytes: list[int], columns: dict[str, str], size_limit: int) -> int:
    """Bytes of the shards of one part whose samples (in order) take ``sample_bytes``: MDSWriter's packing."""
    header = mds_shard_header_bytes(columns, size_limit)
    total, shard = 0, header
    for size in sample_bytes:
        if size_limit < shard + size:  # MDSWriter.write: the shard is flushed before this sample
            total, shard = total + shard, header
        shard += size
    return total + shard if sample_bytes else 0


def patch_preprocessors(cfg: PretokenizeRunConfig, encoders: dict[str, FeatureEncoder]) -> dict:
    """Encoder name -> its patch-feature preprocessing, when the run writes patch features (``patch_features``)."""
    return {name: encoder.patch_preprocess for name, encoder in encoders.items()} if cfg.patch_features else {}


def encode_patches(records: list[dict], encoders: dict[str, FeatureEncoder], enabled: bool) -> dict[str, torch.Tensor]:
    """Encoder name -> patch features [rows, P, D] fp16 of the records' ``patch_pixels``; empty unless the
    run writes patch features."""
    if not enabled:
        return {}
    patches = {}
    for name, encoder in encoders.items():
        pixels = [r["patch_pixels"][name] for r in records]  # each [3, H, W], or [crops, 3, H, W]
        patches[name] = encoder.encode_patches(torch.cat([p.reshape(-1, *p.shape[-3:]) for p in pixels]))
    return patches


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def part_done(out_dir: Path, part: int) -> bool:
    return (out_dir / part_name(part) / PART_DONE_FILE).is_file()


class PartWriter:
    """Buckets records (``task.bucket_key``), encodes full buckets (``task.encode``), writes one part's MDS directory.

    A part holds at most ``items_per_part`` items' samples in memory (a few KB each) so that it can
    write them in input order: the output is independent of batching, workers and processes. An item
    may give several samples (e.g. crops), written one after the other.
    """

    def __init__(self, out_dir: Path, part: int, task, models: Any):
        self.final_dir = out_dir / part_name(part)
        self.tmp_dir = out_dir / (part_name(part) + ".tmp")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # left over from an interrupted run
        self.part = part
        self.task = task
        self.cfg = task.cfg
        self.models = models
        self.writer = MDSWriter(
            out=str(self.tmp_dir), columns=task.columns(), size_limit=self.cfg.shard_size_limit, progress_bar=False,
        )
        self.buckets: dict[Hashable, list[dict]] = defaultdict(list)
        self.samples: dict[int, list[dict]] = {}  # item index -> its samples; written in input order at the end
        self.skipped: list[dict] = []

    def add(self, record: dict) -> None:
        if "reason" in record:
            self.skip(record, record["reason"], record["detail"])
            return
        key = self.task.bucket_key(record)
        self.buckets[key].append(record)
        if len(self.buckets[key]) >= self.cfg.batch_size:
            self._flush(self.buckets.pop(key))

    def skip(self, record: dict, reason: str, detail: str) -> None:
        self.skipped.append(
            {"index": record["index"], "uid": record["uid"], "image": record.get("image"), "reason": reason, "detail": detail}
        )

    def _flush(self, records: list[dict]) -> None:
        for record, result in zip(records, self.task.encode(records, self.models)):
            if isinstance(result, BadItem):
                self.skip(record, result.reason, result.detail)
            else:
                self.samples[record["index"]] = result

    def finish(self) -> dict:
        """Flush what is left, close the shards, mark the part done (atomically)."""
        for key in sorted(self.buckets):
            self._flush(self.buckets[key])
        self.buckets.clear()
        # Input order, whatever the buckets and batch boundaries were.
        written = 0
        for index in sorted(self.samples):
            for sample in self.samples[index]:
                self.writer.write(sample)
                written += 1
        self.writer.finish()
        summary = {"part": self.part, "written": written, "skipped": sorted(self.skipped, key=lambda s: s["index"])}
        atomic_write_json(self.tmp_dir / PART_DONE_FILE, summary)
        shutil.rmtree(self.final_dir, ignore_errors=True)
        self.tmp_dir.rename(self.final_dir)
        return summary
