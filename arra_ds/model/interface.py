"""What the ARRA wrapper needs from a backbone, and what the trainer hands to model code for ZeRO-3.

``ARRAModel`` (``model/arra.py``) works with any backbone through a ``BackboneAdapter``: the
Hugging Face Chameleon family (``model/backbone.py``) and LlamaGen's class-conditional GPT
(``model/llamagen.py``) each provide one. The adapter answers

    run(batch) -> SequenceView    the backbone's final hidden states of every position that predicts a
                                  token, with the batch seen in the text-to-image layout (``input_ids``,
                                  unshifted ``labels``: position t predicts labels[:, t + 1])
    layer_output(L)               the module whose forward output is "the hidden state after layer L"
                                  (a forward hook captures it for the alignment loss)
    lm_head                       an ``LMHeadWithLoss`` (the fused, chunked LM head + CE + z-loss)
    image_token_ids               the ids whose targets are image codes (``<HYBNEXT>`` positions)
    hidden_size, num_layers, ...  facts for the projector and the FLOPs count

Model code stays single-device. Two hooks let the trainer (``train/engine.py``, the only DeepSpeed
module) run it under ZeRO-3 without model code knowing DeepSpeed:

    gather: GatherContext         ``gather(params)``: the full tensors of ``params`` inside the block, rank
                                  0's edits kept on exit (``deepspeed.zero.GatheredParameters``; a no-op here)
    partitioned: PartitionContext ``partitioned()``: modules built inside have their parameters partitioned as
                                  they are created (``deepspeed.zero.Init``; a no-op here). Hugging Face models
                                  get the same from ``transformers``' ``HfDeepSpeedConfig`` instead.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from arra_ds.kernels import lm_head_loss
from arra_ds.tokens.vocab import ChameleonVocab

GatherContext = Callable[[Iterable[nn.Parameter]], ContextManager]
PartitionContext = Callable[[], ContextManager]


def no_gather(params: Iterable[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def no_partitioning() -> ContextManager:
    return contextlib.nullcontext()


class LMHeadWithLoss(nn.Module):
    """An LM head (parameter ``weight`` [V, H], so it keeps the name of the head it replaces: Chameleon's
    ``lm_head.weight``, LlamaGen's ``output.weight``).

    ``head(hidden)`` gives logits as ``nn.Linear`` does (generation); ``head(hidden, targets=y)``
    gives the chunked CE + z-loss without full logits (``arra_ds.kernels.lm_head_loss``: the Triton
    kernel when ``fused_kernels`` selects it, else the torch chunked version). The loss runs inside this
    module's forward so ZeRO-3 gathers ``weight`` for it.
    """

    def __init__(self, weight: nn.Parameter, z_loss_weight: float, chunk_size: int, fused_kernels: str = "auto"):
        super().__init__()
        self.weight = weight
        self.z_loss_weight = z_loss_weight
        self.chunk_size = chunk_size
        self.fused_kernels = fused_kernels

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return nn.functional.linear(hidden, self.weight)
        return lm_head_loss(hidden, self.weight, targets, self.z_loss_weight, self.chunk_size, self.fused_kernels)


@dataclass
class SequenceView:
    """One micro-batch as the ARRA losses see it, whatever the backbone.

    ``input_ids`` / ``labels`` [B, T] follow the text-to-image layout: ``labels`` are unshifted
    (IGNORE_INDEX = not predicted), so position t predicts ``labels[:, t + 1]``. ``hidden`` [B, T - 1, H]
    holds the final (normed) hidden states of positions 0 .. T - 2, the ones that predict a token; the
    layer-L hidden state captured by the hook is indexed by the same positions.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    hidden: torch.Tensor


class BackboneAdapter(abc.ABC):
    """The backbone ``module`` (registered as ``ARRAModel.backbone``: its parameter names are the
    checkpoint's) and everything ARRA asks of it."""

    def __init__(self, module: nn.Module, vocab: ChameleonVocab | None = None):
        self.module = module
        self.vocab = vocab  # the text vocabulary; None for a class-conditional backbone

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Rows of the LM head."""

    @property
    @abc.abstractmethod
    def initializer_range(self) -> float:
        """Std of the backbone's own weight init (the projector's with ``align.projector_init=hf``)."""

    @property
    @abc.abstractmethod
    def image_token_ids(self) -> torch.Tensor:
        """int64 [N]: the ids that are image codes (an aligned ``<HYBNEXT>`` position predicts one)."""

    @property
    def image_start_id(self) -> int | None:
        """The id of the token that opens an image (``align.target=rep``), or None if the layout has none."""
        return None

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The id the data loader pads sequences with."""

    @property
    @abc.abstractmethod
    def lm_head(self) -> LMHeadWithLoss: ...

    @property
    @abc.abstractmethod
    def input_embedding(self) -> nn.Parameter:
        """The input embedding table (left out of the N of the FLOPs formula)."""

    @abc.abstractmethod
    def layer_output(self, layer: int) -> nn.Module:
        """The module whose forward output is the hidden state after decoder layer ``layer`` (1-based)."""

    @abc.abstractmethod
    def run(self, batch: dict) -> SequenceView:
        """The backbone on one training micro-batch (the loader's collated tensors)."""
