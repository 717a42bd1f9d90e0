"""Training data loader: MDS shards -> padded batches, with a resumable loader state.

``StreamingDataset`` gives a deterministic global sample order that depends on the shuffle seed and
``num_canonical_nodes``, not on the number of ranks, and its ``StreamingDataLoader`` state
(samples yielded in the current epoch) is saved in every checkpoint, so a resumed run continues
with exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from arra_ds.data.demo import DemoDataConfig, demo_dir, write_demo_dataset
from arra_ds.data.schema import check_columns
from arra_ds.model.losses import IGNORE_INDEX

DEMO_PATH = "demo"


@dataclass
class DataConfig:
    path: str = DEMO_PATH  # local MDS dir, remote URL (s3://, gs://, ...), or "demo" (built-in)
    cache_dir: str = ""  # local cache for a remote path; required when path is remote
    max_seq_len: int = 4096
    overlong: Literal["truncate", "error"] = "truncate"  # sequences longer than max_seq_len
    shuffle: bool = True
    num_workers: int = 0
    pad_to_multiple_of: int = 8  # pad T to a multiple of this (tensor-core friendly)
    num_canonical_nodes: int = 0  # 0 = streaming's default; keep fixed across resumes
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)

    @property
    def is_demo(self) -> bool:
        return self.path == DEMO_PATH

    @property
    def is_remote(self) -> bool:
        return "://" in self.path

    def validate(self) -> None:
        from arra_ds.config import ConfigError

        if self.is_demo:
            self.demo.validate()
        elif self.is_remote:
            if not self.cache_dir:
                raise ConfigError(f"data.path={self.path} is remote: set data.cache_dir=<local dir> for its shards")
        elif not (Path(self.path) / "index.json").is_file():
            raise ConfigError(
                f"data.path={self.path}: no index.json there. Point it at an MDS data set written by "
                "launch/pretokenize.py, or use data.path=demo"
            )
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len} must be >= 2")
        if self.num_workers < 0 or self.pad_to_multiple_of < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.pad_to_multiple_of >= 1")


def prepare_data_dir(cfg: DataConfig, seed: int) -> tuple[str | None, str]:
    """(remote, local) for StreamingDataset; builds the demo set on first use.

    Call on every rank; only local rank 0 writes the demo set, the others wait at a barrier.
    """
    from arra_ds import dist

    if cfg.is_demo:
        local = demo_dir(cfg.demo, seed)
        if dist.local_rank() == 0:
            write_demo_dataset(local, cfg.demo, seed)
        dist.barrier()
        return None, str(local)
    if cfg.is_remote:
        return cfg.path, cfg.cache_dir
    return None, cfg.path


class SampleConverter:
    """One raw MDS sample -> {input_ids [T], labels [T], target_features [D]} tensors."""

    def __init__(self, feature_column: str | None, max_seq_len: int, overlong: str):
        self.feature_column = feature_column
        self.max_seq_len = max_seq_len
        self.overlong = overlong

    def __call__(self, sample: dict) -> dict:
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        prompt_len = int(sample["prompt_len"])
        if len(tokens) > self.max_seq_len:
            if self.overlong == "error":
                raise ValueError(
                    f"sample {sample.get('uid')!r} has {len(tokens)} tokens > data.max_seq_len={self.max_seq_len}; "
                    "raise data.max_seq_len or set data.overlong=truncate"
                )
            tokens = tokens[: self.max_seq_len]
        labels = tokens.copy()
        labels[: min(prompt_len, len(labels))] = IGNORE_INDEX
        item = {"input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}
        if self.feature_column is not None:
            item["target_features"] = torch.from_numpy(np.asarray(sample[self.feature_column], dtype=np.float32))
        return item


class ARRAStreamingDataset(StreamingDataset):
    """StreamingDataset that yields training tensors (picklable for loader workers)."""

    def __init__(self, *, converter: SampleConverter, **kwargs):
        super().__init__(**kwargs)
        self.converter = converter

    def __getitem__(self, index):
        return self.converter(super().__getitem__(index))


@dataclass
class Collator:
    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(it["input_ids"]) for it in items)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = it["input_ids"]
            labels[i, :n] = it["labels"]
            attention_mask[i, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "target_features" in items[0]:
            out["target_features"] = torch.stack([it["target_features"] for it in items])  # [B, D]
        return out


def ensure_streaming_env() -> None:
    """streaming reads LOCAL_WORLD_SIZE; the deepspeed launcher exports LOCAL_SIZE instead."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def build_dataset(cfg: DataConfig, micro_batch_size: int, seed: int, feature_column: str | None, remote, local):
    ensure_streaming_env()
    if remote is None:
        check_columns(local, feature_column)
    kwargs = dict(
        remote=remote,
        local=local,
        batch_size=micro_batch_size,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        converter=SampleConverter(feature_column, cfg.max_seq_len, cfg.overlong),
    )
    if cfg.num_canonical_nodes:
        kwargs["num_canonical_nodes"] = cfg.num_canonical_nodes
    return ARRAStreamingDataset(**kwargs)


def build_dataloader(dataset, cfg: DataConfig, micro_batch_size: int, pad_id: int):
    return StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=Collator(pad_id, cfg.pad_to_multiple_of),
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
    )


def feature_dim_of(dataset, feature_column: str) -> int:
    """D of the target features, read from the first sample."""
    sample = dataset.get_item(0)
    return int(np.asarray(sample[feature_column]).shape[-1])


def resolve_feature_dim(align_cfg, data_dim: int) -> int:
    """D for the projector: the data decides; an explicit align.feature_dim must agree with it."""
    from arra_ds.config import ConfigError

    if align_cfg.feature_dim and align_cfg.feature_dim != data_dim:
        raise ConfigError(
            f"align.feature_dim={align_cfg.feature_dim} but the data column {align_cfg.feature_column} holds "
            f"{data_dim}-d features; drop align.feature_dim (it is read from the data) or use matching data"
        )
    return data_dim
