"""Training data loader: MDS shards -> padded batches, with a resumable loader state.

The loader receives a resolved local directory or remote URL (``data.path=demo`` is resolved by the
trainer, which builds the demo set first). ``StreamingDataset`` gives a deterministic global sample order that depends on the shuffle seed and
``num_canonical_nodes``, not on the number of ranks, and its ``StreamingDataLoader`` state
(samples yielded in the current epoch) is saved in every checkpoint, so a resumed run continues
with exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from arra_ds import distributed
from arra_ds.data.schema import CLASS_COLUMN, SchemaError, check_columns, is_patch_column
from arra_ds.data.shards import check_shards
from arra_ds.data.shm import clean_stale_streaming_shm, serialise_prefix_claims
from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import IGNORE_INDEX

DEMO_PATH = "demo"  # data.path of the built-in demo set (built by arra_ds.demo, resolved by the trainer)


@dataclass
class DataConfig:
    path: str = ""  # local MDS dir, remote URL (s3://, gs://, ...), or "demo" (the built-in demo set)
    cache_dir: str = ""  # local cache for a remote path; required when path is remote
    max_seq_len: int = 4096
    # sequences longer than max_seq_len: cut to max_seq_len, stop with an error, or leave out of the
    # batch; truncated and skipped samples are counted in metrics.jsonl and the run summary
    overlong: Literal["truncate", "skip", "error"] = "truncate"
    shuffle: bool = True
    num_workers: int = 0
    pad_to_multiple_of: int = 8  # pad T to a multiple of this (tensor-core friendly)
    # with the seed, fixes the global sample order for any number of ranks and nodes; the run config
    # records the value in use
    num_canonical_nodes: int = 0  # 0 = nodes of the first start (streaming's default); a resume keeps the checkpoint's

    @property
    def is_demo(self) -> bool:
        return self.path == DEMO_PATH

    @property
    def is_remote(self) -> bool:
        return "://" in self.path

    def validate(self) -> None:
        if not self.path:
            raise ConfigError(
                f"data.path is not set: give an MDS data set (a directory written by launch/pretokenize.py or a "
                f"remote URL), or data.path={DEMO_PATH} for the built-in demo images"
            )
        # data.path=demo is built on first use by the trainer (arra_ds.demo) and checked by the run config
        if self.is_remote and not self.cache_dir:
            raise ConfigError(f"data.path={self.path} is remote: set data.cache_dir=<local dir> for its shards")
        if not (self.is_demo or self.is_remote or (Path(self.path) / "index.json").is_file()):
            raise ConfigError(
                f"data.path={self.path}: no index.json there. Point it at an MDS data set written by "
                "launch/pretokenize.py, or use data.path=demo"
            )
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len} must be >= 2")
        if self.num_workers < 0 or self.pad_to_multiple_of < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.pad_to_multiple_of >= 1")


def remove_stale_shared_memory() -> None:
    """Call on every rank before any dataset is built: local rank 0 of each node removes the
    shared-memory blocks a crashed run left behind, the other ranks wait at a barrier."""
    if distributed.local_rank() == 0:
        removed = clean_stale_streaming_shm()
        if removed:
            prefixes = sorted({name.split("_", 1)[0] for name in removed})
            print(
                f"removed {len(removed)} stale streaming shared-memory blocks from /dev/shm, left by "
                f"{len(prefixes)} crashed dataset(s) (prefixes {', '.join(prefixes)})",
                flush=True,
            )
    distributed.barrier()


def physical_nodes() -> int:
    """Nodes of this run as streaming counts them (ranks / ranks per node)."""
    ensure_streaming_env()
    world = distributed.world_size()
    return max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def resolve_canonical_nodes(cfg: DataConfig, loader_state: dict | None) -> int:
    """The canonical node count for this start: the resumed checkpoint's (it fixed the sample order so
    far), else ``data.num_canonical_nodes``, else this run's node count (streaming's own default)."""
    saved = (loader_state or {}).get("num_canonical_nodes")
    if saved:
        if cfg.num_canonical_nodes and cfg.num_canonical_nodes != saved:
            raise ConfigError(
                f"data.num_canonical_nodes={cfg.num_canonical_nodes}, but the checkpoint's sample order was built with "
                f"{saved} canonical nodes and a resumed run must keep it (else samples repeat or go missing in this "
                f"epoch); drop the override or set data.num_canonical_nodes={saved}"
            )
        return int(saved)
    return cfg.num_canonical_nodes or physical_nodes()


def streaming_location(cfg: DataConfig, resolved_path: str) -> tuple[str | None, str]:
    """(remote, local) arguments of StreamingDataset for a resolved data path."""
    if cfg.is_remote:
        return resolved_path, cfg.cache_dir
    return None, resolved_path


class SampleConverter:
    """One raw MDS sample -> {input_ids [T], labels [T], target_features [D], uid} tensors, plus
    ``class_id`` (a scalar) for class-to-image samples (``class_conditional``). A patch column
    (``patch_<encoder>``, align.feature=patch) gives ``target_patches`` [P, D] instead of target_features.

    With ``overlong="skip"`` an over-long sample is marked ``skipped="overlong"`` (its tensors cut to
    ``max_seq_len``, kept only as a possible filler row): the ``Collator`` leaves it out of the batch and
    counts it. The sample still occupies its slot in the global order, so the loader state and the
    other ranks are unaffected.
    """

    def __init__(
        self, feature_column: str | None, max_seq_len: int, overlong: str, feature_dim: int = 0, class_conditional: bool = False
    ):
        self.feature_column = feature_column
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.feature_dim = feature_dim  # D every feature must have; 0 = not known yet (set by the trainer)
        self.class_conditional = class_conditional

    @property
    def patches(self) -> bool:
        """Whether the targets are patch features [P, D] (a ``patch_<encoder>`` column)."""
        return self.feature_column is not None and is_patch_column(self.feature_column)

    def _features(self, sample: dict, uid: str) -> torch.Tensor:
        feature = np.asarray(sample[self.feature_column], dtype=np.float32)
        expected_rank = 2 if self.patches else 1
        if feature.ndim != expected_rank or (self.feature_dim and feature.shape[-1] != self.feature_dim):
            raise SchemaError(
                f"sample {uid!r}: column {self.feature_column} has shape {list(feature.shape)}, expected "
                f"[{'P, ' if self.patches else ''}{self.feature_dim or 'D'}] like the rest of the data set; the data "
                "set mixes feature extractors, re-run pre-tokenization for it"
            )
        if self.patches and math.isqrt(feature.shape[0]) ** 2 != feature.shape[0]:
            raise SchemaError(
                f"sample {uid!r}: column {self.feature_column} holds {feature.shape[0]} patches, not a square grid; "
                "re-run pre-tokenization for it"
            )
        if not np.isfinite(feature).all():
            raise SchemaError(
                f"sample {uid!r}: column {self.feature_column} holds non-finite values; re-run pre-tokenization for it"
            )
        return torch.from_numpy(feature)

    def __call__(self, sample: dict) -> dict:
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        prompt_len = int(sample["prompt_len"])
        uid = str(sample.get("uid", ""))
        item: dict = {"uid": uid}
        if self.feature_column is not None:
            item["target_patches" if self.patches else "target_features"] = self._features(sample, uid)
        if self.class_conditional:
            if sample.get(CLASS_COLUMN) is None:
                raise SchemaError(
                    f"sample {uid!r} has no '{CLASS_COLUMN}': the data set is not class-to-image; write it with "
                    "launch/pretokenize_imagefolder.py"
                )
            item["class_id"] = torch.tensor(int(sample[CLASS_COLUMN]), dtype=torch.long)
        if len(tokens) > self.max_seq_len:
            if self.overlong == "error":
                raise SchemaError(
                    f"sample {uid!r} has {len(tokens)} tokens > data.max_seq_len={self.max_seq_len}; "
                    "raise data.max_seq_len or set data.overlong=truncate or data.overlong=skip"
                )
            tokens = tokens[: self.max_seq_len]
            item["skipped" if self.overlong == "skip" else "truncated"] = "overlong"
        labels = tokens.copy()
        labels[: min(prompt_len, len(labels))] = IGNORE_INDEX
        return {**item, "input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}


class ARRAStreamingDataset(StreamingDataset):
    """StreamingDataset that yields training tensors (picklable for loader workers)."""

    def __init__(self, *, converter: SampleConverter, **kwargs):
        super().__init__(**kwargs)
        self.converter = converter

    def __getitem__(self, index):
        return self.converter(super().__getitem__(index))


@dataclass
class BatchMeta:
    """What a batch holds besides tensors: which samples are in it and which were left out."""

    uids: list[str]  # samples in the batch, in row order
    skipped_uids: list[str]  # over-long samples left out (data.overlong=skip)
    num_truncated: int  # samples cut to data.max_seq_len (data.overlong=truncate)

    @property
    def num_samples(self) -> int:
        return len(self.uids)

    @property
    def num_consumed(self) -> int:
        """Samples this batch took from the stream (kept + skipped): what the loader state counts."""
        return len(self.uids) + len(self.skipped_uids)


@dataclass
class Collator:
    """Right-pads samples into a batch; ``batch["meta"]`` is a ``BatchMeta``.

    When every sample of a micro-batch was skipped, the batch is the first skipped sample cut to
    ``max_seq_len`` (``meta.num_samples == 0`` marks it) and the training loop multiplies its loss by
    zero. Under ZeRO-3 every rank must run the same forward/backward collectives, with gradients
    becoming ready in the same order, in every micro-step; a real sample takes exactly the code path
    of any other batch, so the filler adds nothing to the update yet keeps the ranks in lock-step.
    """

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, items: list[dict]) -> dict:
        kept = [it for it in items if "skipped" not in it]
        meta = BatchMeta(
            uids=[it.get("uid", "") for it in kept],
            skipped_uids=[it["uid"] for it in items if "skipped" in it],
            num_truncated=sum(1 for it in kept if it.get("truncated")),
        )
        rows = kept or items[:1]
        longest = max(len(it["input_ids"]) for it in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, it in enumerate(rows):
            n = len(it["input_ids"])
            input_ids[i, :n] = it["input_ids"]
            labels[i, :n] = it["labels"]
            attention_mask[i, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "meta": meta}
        if "target_features" in rows[0]:
            out["target_features"] = torch.stack([it["target_features"] for it in rows])  # [B, D]
        if "target_patches" in rows[0]:
            num_patches = {tuple(it["target_patches"].shape) for it in rows}
            if len(num_patches) > 1:
                raise SchemaError(f"patch features of different shapes {sorted(num_patches)} in one batch")
            out["target_patches"] = torch.stack([it["target_patches"] for it in rows])  # [B, P, D]
            side = math.isqrt(out["target_patches"].shape[1])
            out["patch_grid"] = torch.tensor([side, side])  # the encoder's square patch grid, raster order
        if "class_id" in rows[0]:
            out["class_ids"] = torch.stack([it["class_id"] for it in rows])  # [B]
        return out


def ensure_streaming_env() -> None:
    """Call before building a ``StreamingDataset``: streaming reads LOCAL_WORLD_SIZE (the deepspeed launcher
    exports LOCAL_SIZE instead), and its shared-memory prefix is claimed host-wide one job at a time
    (``shm.serialise_prefix_claims``: two jobs starting together would otherwise clash)."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    serialise_prefix_claims()


def build_dataset(
    cfg: DataConfig, micro_batch_size: int, seed: int, feature_column: str | None, remote, local, class_conditional: bool = False
):
    """The training data set; ``class_conditional``: class-to-image samples (the backbone draws for class labels)."""
    ensure_streaming_env()
    if remote is None:
        check_columns(local, feature_column, class_conditional)
        check_shards(local)
    kwargs = dict(
        remote=remote,
        local=local,
        batch_size=micro_batch_size,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        converter=SampleConverter(feature_column, cfg.max_seq_len, cfg.overlong, class_conditional=class_conditional),
    )
    if cfg.num_canonical_nodes:
        kwargs["num_canonical_nodes"] = cfg.num_canonical_nodes
    return ARRAStreamingDataset(**kwargs)


class ARRAStreamingDataLoader(StreamingDataLoader):
    """Counts consumed samples from ``batch["meta"]``: with skipped samples (or a filler row) the
    tensors' first dimension is not what the stream advanced by, and the resume state must be."""

    def _get_batch_size(self, batch) -> int:
        return batch["meta"].num_consumed


def build_dataloader(dataset, cfg: DataConfig, micro_batch_size: int, pad_id: int, seed: int = 0):
    # A private generator: torch's DataLoader draws a base seed from it for every new iterator (every
    # epoch). Drawn from the global RNG instead, a resumed run's dropout stream would diverge from the
    # uninterrupted run's.
    # Class-to-image samples all hold one image's codes, a fixed count: padding them would only add positions.
    pad_to_multiple_of = 1 if dataset.converter.class_conditional else cfg.pad_to_multiple_of
    return ARRAStreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=Collator(pad_id, pad_to_multiple_of),
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def feature_dim_of(dataset, feature_column: str) -> int:
    """D of the target features, read from the first sample."""
    sample = dataset.get_item(0)
    return int(np.asarray(sample[feature_column]).shape[-1])


def resolve_feature_dim(align_cfg, data_dim: int) -> int:
    """D for the projector: the data decides; an explicit align.feature_dim must agree with it."""
    if align_cfg.feature_dim and align_cfg.feature_dim != data_dim:
        raise ConfigError(
            f"align.feature_dim={align_cfg.feature_dim} but the data column {align_cfg.feature_column} holds "
            f"{data_dim}-d features; drop align.feature_dim (it is read from the data) or use matching data"
        )
    return data_dim
