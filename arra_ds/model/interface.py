"""The interfaces between backbones and the rest of arra_ds.

A backbone (``model.source``) is one module under ``arra_ds/model/`` that provides a ``Backbone``: everything
about it, from config checks and building to sampling hooks, decoding and export (see ``Backbone``). The
registry (``model/registry.py``) finds it by name. Training talks to the built model through a
``BackboneAdapter``, sampling through an ``ImageStepper``.

``ARRAModel`` (``model/arra.py``) works with any backbone through its ``BackboneAdapter``, which answers

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
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Literal, Protocol, Sequence

import torch
from torch import nn

from arra_ds.errors import ConfigError
from arra_ds.kernels import lm_head_loss
from arra_ds.tokens.vocab import ChameleonVocab

GatherContext = Callable[[Iterable[nn.Parameter]], ContextManager]
PartitionContext = Callable[[], ContextManager]


def no_gather(params: Iterable[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def no_partitioning() -> ContextManager:
    return contextlib.nullcontext()


class LMHeadWithLoss(nn.Module):
    """An LM head (parameter ``weight`` [V, H], and ``bias`` [V] if the head it replaces has one, so it keeps the
    names of that head: Chameleon's ``lm_head.weight``, LlamaGen's ``output.weight``, Janus's
    ``generation_head.vision_head.{weight,bias}``).

    ``head(hidden)`` gives logits as ``nn.Linear`` does (generation); ``head(hidden, targets=y)``
    gives the chunked CE + z-loss without full logits (``arra_ds.kernels.lm_head_loss``: the Triton
    kernel when ``fused_kernels`` selects it, else the torch chunked version). The loss runs inside this
    module's forward so ZeRO-3 gathers ``weight`` (and ``bias``) for it. A bias enters the loss as one more
    input column: [hidden, 1] @ [weight, bias]^T = hidden @ weight^T + bias.
    """

    def __init__(self, weight: nn.Parameter, z_loss_weight: float, chunk_size: int, fused_kernels: str = "auto",
                 bias: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.z_loss_weight = z_loss_weight
        self.chunk_size = chunk_size
        self.fused_kernels = fused_kernels

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def effective_weight(self) -> torch.Tensor:
        """[V, H]: the weight the head computes with (a subclass may add a trained delta to some rows)."""
        return self.weight

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None):
        weight = self.effective_weight()
        if targets is None:
            return nn.functional.linear(hidden, weight, self.bias)
        if self.bias is not None:  # [N, H + 1] @ [V, H + 1]^T: the bias as a column of ones in hidden
            hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[:-1] + (1,))], dim=-1)
            weight = torch.cat([weight, self.bias[:, None].to(weight.dtype)], dim=1)
        return lm_head_loss(hidden, weight, targets, self.z_loss_weight, self.chunk_size, self.fused_kernels)


@dataclass
class SequenceView:
    """One micro-batch as the ARRA losses see it, whatever the backbone.

    ``input_ids`` / ``labels`` [B, T] follow the text-to-image layout: ``labels`` are unshifted
    (IGNORE_INDEX = not predicted), so position t predicts ``labels[:, t + 1]``. ``hidden`` [B, T - 1, H']
    holds what ``lm_head`` takes at positions 0 .. T - 2, the ones that predict a token: the final (normed) hidden
    states (H' = H) or, for a head with layers before its last linear one (Janus's generation head: Linear - GELU
    - Linear), their output; the layer-L hidden state captured by the hook is indexed by the same positions.
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

    @abc.abstractmethod
    def code_grid(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """The code grid (h, w) of the image in one sample, read from its sequence (``SequenceView`` rows [T])."""


# ------------------------------------------------------------------------------------------------
# Sampling: one step loop for every backbone (arra_ds/generate/sampler.py) drives an ImageStepper
# ------------------------------------------------------------------------------------------------


class ImageStepper(abc.ABC):
    """One batch of autoregressive image sampling on one backbone: what the generic step loop asks of it.

    The loop draws ``num_steps`` tokens after the condition's prefix. Rows: the B conditional rows, then (with
    classifier-free guidance) B unconditional rows fed the same tokens (R = B or 2B). At step s the stepper
    either forces a token (``forced_token(s)``: a Chameleon row end or end of image) or the loop draws one from
    ``logits()`` restricted to ``allowed``. ``codes`` turns the B drawn rows into code grids.
    """

    num_steps: int  # tokens after the prefix: drawn codes and forced structure tokens
    device: torch.device  # where the model runs (and the tokens fed to it live)
    allowed: torch.Tensor | None  # bool [V]: tokens a drawn position may take (None: every row of the head)
    text_stop_ids: frozenset[int] = frozenset()  # ends of text sampled after the image; empty = no text after it
    pad_id: int = 0

    @abc.abstractmethod
    def prefix_length(self, condition) -> int:
        """Tokens of the conditional prefix of ``condition`` (for left-padding a batch to a fixed width)."""

    @abc.abstractmethod
    def start(self, conditions: Sequence, guided: bool, pad_to: int = 0) -> None:
        """Run the prefix of every row (padded to at least ``pad_to``); ``guided`` adds the unconditional rows."""

    @abc.abstractmethod
    def logits(self) -> torch.Tensor:
        """[R, V] fp32: the next-token logits of every row at the current position."""

    @abc.abstractmethod
    def feed(self, tokens: torch.Tensor, attend: torch.Tensor | None = None) -> None:
        """Append ``tokens`` [R] (int64) to every row; ``attend`` [R] bool: rows whose token is real (default all)."""

    def forced_token(self, step: int) -> int | None:
        """The token forced at step ``step`` after the prefix, or None where a code is drawn."""
        return None

    @abc.abstractmethod
    def codes(self, drawn: torch.Tensor) -> torch.Tensor:
        """drawn [B, num_steps] (the tokens of every step, forced ones included) -> codes [B, h, w] int64."""


def refuse_rep_token(backbone_name: str, rep_token: bool) -> None:
    """The stepper of a layout without an assistant turn cannot honour ``RunData.rep_token``."""
    if rep_token:
        raise ConfigError(
            f"the model's data opens the assistant turn with <REP> (pre-tokenised with rep_token=true), which "
            f"model.source={backbone_name} has no place for; only the Chameleon layout does"
        )


class ImageDecoder(Protocol):
    """VQ codes -> pixels, with the image tokenizer the data was pre-tokenised with."""

    downsample_factor: int  # pixels per code side

    def to(self, device) -> "ImageDecoder": ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] int -> pixels [B, 3, f * h, f * w], about [-1, 1]."""


# ------------------------------------------------------------------------------------------------
# A backbone: one module provides everything about it; the registry finds it by model.source
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneShape:
    """Facts of a configured backbone that are known before it is built."""

    num_layers: int
    hidden_size: int
    max_positions: int  # the longest data sequence (tokens of one sample) it takes; 0 = unknown


@dataclass(frozen=True)
class Architecture:
    """The sizes a memory plan counts with (``arra_ds/train/plan.py``), from the config alone."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # MLP width
    vocab: int  # rows of the LM head
    qk_norm: bool  # per-head norms of q and k (Chameleon's), whose inputs backward keeps
    head: str  # the LM head's module name
    image_rows: torch.Tensor  # int64 [N]: the LM head's rows of image codes
    lora_targets: tuple[str, ...]  # every Linear of a block: the default LoRA targets (model.lora.target_modules=[])


@dataclass(frozen=True)
class ExportResult:
    """What a backbone's export wrote (``out_dir``) and said about it (a summary for ``arra_export.json``)."""

    files: list[str]
    summary: dict


class Backbone(abc.ABC):
    """Everything arra_ds knows about one ``model.source``. ``cfg`` below is the run's ``ModelConfig``
    (``model/config.py``); a backbone reads its own section of it and the shared keys (attention, dropout,
    activation checkpointing, LM-loss chunking, fused kernels).

    Training: ``validate``, ``shape``, ``build`` (under ZeRO-3: the trainer's ``gather`` / ``partitioned``
    hooks). Data: ``condition`` (text prompts or class labels), ``vocab``. Inference: ``skeleton`` (the built
    module's layout on the meta device, for a trained state dict), ``claims`` / ``load_pretrained`` (a model
    that is not a trainer checkpoint), ``text_tokenizer``, ``stepper`` (sampling hooks), ``load_decoder``
    (codes to pixels). Self-contained runs: ``inference_files`` / ``for_inference``. Export: ``export``.
    """

    name: ClassVar[str]  # the model.source value
    condition: ClassVar[Literal["text", "class"]]
    # SamplingConfig fields left at None take these (e.g. guidance_scale, image_top_k): what the model family
    # is sampled with in its paper / reference code
    sampling_defaults: ClassVar[dict[str, Any]] = {}
    code_patch_px: ClassVar[int] = 16  # pixels per VQ code side of its image tokenizer

    # ---- config ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def validate(self, cfg) -> None:
        """Raise ConfigError for a setting this backbone cannot use (its own section and the shared keys)."""

    @abc.abstractmethod
    def shape(self, cfg) -> BackboneShape: ...

    @abc.abstractmethod
    def architecture(self, cfg) -> Architecture:
        """The sizes of the built model (for the memory plan), from the config alone."""

    # ---- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self, cfg, dtype: torch.dtype, gather: GatherContext, partitioned: PartitionContext) -> BackboneAdapter:
        """The backbone, built (random init) or loaded, behind the ARRA interface."""

    def vocab(self, cfg) -> ChameleonVocab | None:
        """The text vocabulary (from the config alone, no weights); None for a class-conditional backbone. Besides
        ids by name (``id``, ``pad_id``) it reads the backbone's pre-tokenised samples back: ``split_sample(tokens,
        prompt_len) -> (prompt ids, codes [h, w])`` (``ChameleonVocab``; Janus-Pro's ``tokens/janus.py``)."""
        return None

    # ---- inference -------------------------------------------------------------------------------
    @abc.abstractmethod
    def skeleton(self, cfg, dtype: torch.dtype) -> nn.Module:
        """The module ``build`` makes, parameters on the meta device: a trained state dict is assigned into it."""

    def claims(self, path: Path) -> dict | None:
        """For a model path that is not a trainer checkpoint (a released or exported model) that this backbone
        recognises: the ``model`` section values that load it with ``load_pretrained`` (``source`` among them) and
        ``kind`` (what the path is, for reports); else None."""
        return None

    def load_pretrained(self, cfg, path: Path, dtype: torch.dtype) -> nn.Module:
        """The model at ``path`` that this backbone ``claims``, for inference (CPU, ``dtype``)."""
        raise NotImplementedError(f"model.source={self.name} loads only trainer checkpoints for inference")

    def text_tokenizer(self, cfg, override: str = ""):
        """The prompt tokenizer (``tokenizers.Tokenizer``); None for a class-conditional backbone."""
        return None

    def encode_prompt(self, tokenizer, vocab: ChameleonVocab, text: str) -> list[int]:
        """Prompt text -> token ids without the frame the stepper adds."""
        raise NotImplementedError(f"model.source={self.name} takes no text prompts")

    def num_classes(self, cfg) -> int:
        """Class labels a class-conditional model draws for."""
        raise NotImplementedError(f"model.source={self.name} is not class-conditional")

    @abc.abstractmethod
    def sampling_grid(self, cfg, height_px: int, width_px: int) -> tuple[int, int]:
        """The code grid (h, w) sampled for a requested size in pixels (0 = the backbone's own size, if it has one);
        ConfigError for a size it cannot draw."""

    @abc.abstractmethod
    def stepper(self, module: nn.Module, vocab: ChameleonVocab | None, grid: tuple[int, int],
                rep_token: bool = False) -> ImageStepper:
        """``rep_token``: the model was trained on data whose assistant turn opens with <REP> (``RunData.rep_token``);
        a layout without such a turn raises ConfigError."""

    @abc.abstractmethod
    def load_decoder(self, config_file: str, checkpoint_file: str) -> ImageDecoder:
        """The image tokenizer's decoder (CPU, eval mode) from its config and weights files."""

    # ---- self-contained runs ---------------------------------------------------------------------
    def inference_files(self, cfg) -> list[Path]:
        """Small files of the base checkpoint that inference reads besides the trained weights (config,
        tokenizer): the trainer copies them into the run, so the run works after the base moves."""
        return []

    def for_inference(self, cfg, copied_dir: Path):
        """``cfg`` reading the copies of ``inference_files`` in ``copied_dir`` instead of the base checkpoint."""
        return cfg

    def base_weights(self, cfg) -> dict[str, torch.Tensor]:
        """Untrained tensors of the base checkpoint that an export carries (e.g. Chameleon's VQ encoder), {} if none."""
        return {}

    # ---- export ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def export(self, cfg, state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], out_dir: Path,
               dtype: torch.dtype | None) -> ExportResult:
        """Write the trained backbone ``state`` (its own parameter names) in the family's released format."""
