"""The input-specific half of a pre-tokenization run; ``run.py`` is the other half (parts over
processes, resume, merging, the report) and is the same for every input kind.

A task says what the items are, how a DataLoader worker turns one into a record (image decoding,
crops, checks; never raising), and how the main process turns a batch of records into MDS samples
(the VQ tokenizer and the feature encoders, batched). The tasks:

    conversation.py   ConversationTask   conversation JSON, caption table, image + .txt pairs or WebDataset
                                         shards (sources.py) -> text-to-image samples (Chameleon VQGAN)
    imagefolder.py    ImageFolderTask    ImageFolder tree  -> class-to-image samples (LlamaGen VQ-16)
    janus.py          JanusTask          conversation JSON -> Janus-Pro text-to-image samples (its VQ tokenizer)

A task is pickled into spawned processes: it holds its config and nothing heavy (models are loaded
per process by ``load_models``).
"""

from __future__ import annotations

import abc
from typing import Any, Hashable

import torch
from torch.utils.data import Dataset

from arra_ds.data.pretokenize.config import PretokenizeRunConfig
from arra_ds.data.pretokenize.items import BadItem


class PretokenizeTask(abc.ABC):
    cfg: PretokenizeRunConfig

    def __init__(self, cfg: PretokenizeRunConfig):
        self.cfg = cfg

    def validate(self) -> None:
        self.cfg.validate()

    @abc.abstractmethod
    def items(self) -> list:
        """Every input item, in a fixed order (item i is in part i // items_per_part)."""

    @abc.abstractmethod
    def content_key(self) -> dict:
        """Settings (and input identity) that change the written samples; a resume must match them."""

    @abc.abstractmethod
    def columns(self) -> dict[str, str]:
        """The MDS columns of a sample (``arra_ds.data.schema.columns_for``)."""

    @abc.abstractmethod
    def load_models(self, device: torch.device) -> Any:
        """The VQ tokenizer, feature encoders and whatever else ``encode`` needs, on ``device``."""

    @abc.abstractmethod
    def item_dataset(self, selected: list[tuple[int, Any]], models: Any) -> Dataset:
        """(item index, item) pairs -> records: dicts with ``index``, ``uid`` and either the preprocessed
        inputs or ``reason`` / ``detail`` (a bad item). Runs in DataLoader workers; never raises."""

    def bucket_key(self, record: dict) -> Hashable:
        """Records with the same key are encoded in one batch (e.g. one crop size)."""
        return ()

    @abc.abstractmethod
    def encode(self, records: list[dict], models: Any) -> list[list[dict] | BadItem]:
        """One batch of good records (same bucket) -> for each record its MDS samples, or why it is skipped."""

    def report_extras(self) -> dict:
        """What the task adds to the run's summary and report.json (e.g. the class list)."""
        return {}
