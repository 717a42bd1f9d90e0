"""Writing one part: the MDS writer of a part, fed by a task's batched ``encode``."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch
from streaming import MDSWriter

from arra_ds.data.pretokenize.config import PART_DONE_FILE
from arra_ds.data.pretokenize.items import BadItem
from arra_ds.io import atomic_write_json


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of CPU tensors through numpy: a plain copy, without waking torch's thread pool."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


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
