"""The ARRA model: a backbone, the alignment projector A_phi and the combined loss.

    L = L_AR + z_w * L_z + lambda * L_GVA

L_AR and L_z come from the chunked LM head (never [B, T, V] logits). L_GVA aligns the output of
decoder layer ``align.layer`` (Hugging Face ``hidden_states[layer]``, captured with a forward hook)
at the aligned positions with one global feature per sample. The projector is training-only.

The backbone is reached through a ``BackboneAdapter`` (``model/interface.py``): Chameleon /
Lumina-mGPT / debug (``model/backbone.py``) or LlamaGen's class-conditional GPT (``model/llamagen.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from arra_ds.errors import ConfigError
from arra_ds.kernels import ALIGN_MAX_FEATURE_DIM, gva_loss, projection_alignment_loss
from arra_ds.model.backbone import ModelConfig, build_backbone_adapter
from arra_ds.model.interface import BackboneAdapter, GatherContext, PartitionContext, no_gather, no_partitioning
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.vocab import REP_TOKEN


@dataclass
class AlignConfig:
    weight: float = 1.0  # lambda; 0 trains the AR-only baseline (no projector is built)
    layer: int = 1  # HF hidden_states[layer]: output of decoder layer `layer` (1-based)
    # hybnext: every position whose next token is an image code (the paper's <HYBNEXT>);
    # rep: one position per sample, the token named by rep_token (the paper's <REP>);
    # slice: the reference code's fixed [-(slice_len+1):-1] slice of the padded batch (comparison only).
    target: Literal["hybnext", "rep", "slice"] = "hybnext"
    slice_len: int = 1024
    # target=rep: the token whose position is aligned (its first supervised occurrence). The reference's
    # <REP> is <reserved08795>, which the data must hold (launch/pretokenize.py rep_token=true puts it
    # at the start of the assistant turn); rep_token="<racm3:break>" aligns at the image start instead
    # (works on any data).
    rep_token: str = REP_TOKEN
    projector: Literal["mlp", "maxpool"] = "mlp"  # paper appendix Table 2
    # hf: Hugging Face's _init_weights, as the reference's projector (built inside the HF model) gets:
    # weights normal(0, initializer_range of the backbone config), biases 0; torch: nn.Linear's default.
    projector_init: Literal["hf", "torch"] = "hf"
    loss: Literal["cosine", "mse"] = "cosine"  # paper appendix Table 4
    encoder: str = "biomedclip"  # the data column feat_<encoder> holds the target features
    feature_dim: int = 0  # D; 0 = read from the data (the trainer fills it in)

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def feature_column(self) -> str:
        return f"feat_{self.encoder}"

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"align.weight={self.weight} must be >= 0 (0 disables the alignment term)")
        if self.layer < 1:
            raise ConfigError(f"align.layer={self.layer} must be >= 1 (layer L = output of decoder layer L)")
        if self.slice_len < 1:
            raise ConfigError(f"align.slice_len={self.slice_len} must be >= 1")
        if self.feature_dim < 0:
            raise ConfigError(f"align.feature_dim={self.feature_dim} must be >= 0 (0 = from the data)")
        if self.target == "rep" and not self.rep_token:
            raise ConfigError("align.target=rep needs align.rep_token (a token name, e.g. <reserved08795>)")
        if not self.encoder or not self.encoder.replace("_", "").isalnum():
            raise ConfigError(f"align.encoder={self.encoder!r} must be a plain name such as biomedclip, clip, medsam")


def training_flops_per_token(num_params_no_embedding: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs per token of a decoder-only transformer (PaLM appendix B), forward + backward:

        6 * N + 12 * L * H * T

    N counts every parameter except the input embeddings (the LM head is in), L layers, H hidden
    size, T the sequence length (the attention score and value matmuls); recompute is not counted.
    """
    return 6.0 * num_params_no_embedding + 12.0 * num_layers * hidden_size * seq_len


class AlignHead(nn.Module):
    """A_phi: [N, H] -> [N, D] and the GVA loss against one target per sample.

    ``mlp`` is Linear(H, D) - GELU - Linear(D, D) (the reference code's 2-layer mlp_gelu projector);
    ``maxpool`` is a parameter-free max-pool over the hidden dimension down to D.
    The loss is computed inside ``forward`` so that ZeRO-3 gathers fc1/fc2 for it. For the mlp
    projector, ``fused_kernels`` (model.fused_kernels) may select the Triton kernel
    (``arra_ds.kernels.projection_alignment_loss``), which never stores the [N, D] activations.
    ``init_std``: None keeps nn.Linear's default initialisation; a number gives Hugging Face's
    ``_init_weights`` (weights normal(0, init_std), biases zero).
    """

    def __init__(
        self, hidden_size: int, feature_dim: int, projector: str, loss_kind: str, fused_kernels: str = "auto",
        init_std: float | None = None,
    ):
        super().__init__()
        if projector == "maxpool" and feature_dim > hidden_size:
            raise ConfigError(
                f"align.projector=maxpool cannot widen the hidden size H={hidden_size} to the feature width "
                f"D={feature_dim}; use align.projector=mlp"
            )
        if projector == "mlp" and fused_kernels == "on" and feature_dim > ALIGN_MAX_FEATURE_DIM:
            raise ConfigError(
                f"model.fused_kernels=on: the fused alignment kernel takes D <= {ALIGN_MAX_FEATURE_DIM}, "
                f"this projector has D={feature_dim}; use model.fused_kernels=auto or off"
            )
        self.projector = projector
        self.loss_kind = loss_kind
        self.feature_dim = feature_dim
        self.fused_kernels = fused_kernels
        if projector == "mlp":
            self.fc1 = nn.Linear(hidden_size, feature_dim)
            self.fc2 = nn.Linear(feature_dim, feature_dim)
            if init_std is not None:
                for linear in (self.fc1, self.fc2):
                    nn.init.normal_(linear.weight, mean=0.0, std=init_std)
                    nn.init.zeros_(linear.bias)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.projector == "mlp":
            return self.fc2(nn.functional.gelu(self.fc1(hidden)))
        return nn.functional.adaptive_max_pool1d(hidden.unsqueeze(1), self.feature_dim).squeeze(1)

    def forward(self, hidden: torch.Tensor, sample_idx: torch.Tensor, targets: torch.Tensor):
        # hidden [N, H], sample_idx [N], targets [B, D] -> (loss, mean cosine)
        # With no rows, fc1/fc2 still run on the empty [0, H] input and the loss is a zero tied to
        # their outputs, so they stay in the graph and every rank runs the same ZeRO-3 collectives in
        # backward. (Touching self.parameters() directly instead would see ZeRO-3's empty partitions:
        # a submodule's weights are gathered only while it is called.)
        if self.projector == "mlp":
            return projection_alignment_loss(
                hidden, sample_idx, targets, self.fc1, self.fc2, self.loss_kind, self.fused_kernels
            )
        return gva_loss(self.project(hidden), sample_idx, targets, self.loss_kind)


def aligned_positions(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    vocab_image_mask: torch.Tensor,
    rep_id: int,
    target: str,
    slice_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index [N], time index [N]) of the hidden states to align.

    labels [B, T] are unshifted (-100 = ignored), so position t predicts labels[t + 1]. ``rep_id``:
    the token whose first supervised position ``rep`` aligns (rows without it get no position).
    """
    batch, length = labels.shape
    if target == "hybnext":
        next_label = labels[:, 1:]
        safe = next_label.clamp(min=0)
        is_image = vocab_image_mask[safe] & (next_label != IGNORE_INDEX)  # [B, T-1]
        b_idx, t_idx = is_image.nonzero(as_tuple=True)
        return b_idx, t_idx
    if target == "rep":
        is_start = (input_ids == rep_id) & (labels != IGNORE_INDEX)  # [B, T]
        has = is_start.any(dim=1)
        first = is_start.int().argmax(dim=1)
        b_idx = torch.arange(batch, device=labels.device)[has]
        return b_idx, first[has]
    if target == "slice":
        start = max(length - 1 - slice_len, 0)
        t = torch.arange(start, length - 1, device=labels.device)
        b_idx = torch.arange(batch, device=labels.device).repeat_interleave(t.numel())
        return b_idx, t.repeat(batch)
    raise ValueError(f"unknown align target {target!r}")


class ARRAOutput(NamedTuple):
    """What ``ARRAModel.forward`` returns. A NamedTuple, not a dataclass: DeepSpeed's ZeRO-3 hooks walk
    module outputs (tuples, lists, dicts, namedtuples) to wrap their tensors in the autograd function
    that gathers a module's parameters before its backward; an object they cannot walk gets the
    warning "A module has unknown inputs or outputs type" and no pre-backward hook for that module."""

    loss: torch.Tensor  # total, differentiable
    loss_ar: torch.Tensor  # CE over supervised tokens (detached)
    loss_gva: torch.Tensor  # alignment loss (detached; 0 when disabled)
    loss_z: torch.Tensor  # mean logsumexp^2 (detached, unweighted)
    cos: torch.Tensor  # mean cosine at the aligned positions (detached)
    num_tokens: int  # supervised tokens in this micro-batch
    num_aligned: int  # aligned positions in this micro-batch


class ARRAModel(nn.Module):
    def __init__(self, adapter: BackboneAdapter, align: AlignConfig, fused_kernels: str = "auto"):
        super().__init__()
        self.backbone = adapter.module  # registered here: checkpoints name its parameters backbone.*
        self.adapter = adapter
        self.vocab = adapter.vocab  # the text vocabulary (None for a class-conditional backbone)
        self.align = align
        hidden_size = adapter.hidden_size
        num_layers = adapter.num_layers
        image_token_mask = torch.zeros(adapter.vocab_size, dtype=torch.bool)  # [V]
        image_token_mask[adapter.image_token_ids] = True
        self.register_buffer("image_token_mask", image_token_mask, persistent=False)
        self.align_head: AlignHead | None = None
        self.rep_id = -1  # align.target=rep: id of align.rep_token
        self._capturing = False
        self._captured: torch.Tensor | None = None
        if align.enabled:
            if align.feature_dim < 1:
                raise ValueError("align.feature_dim must be resolved from the data before build_model")
            if not 1 <= align.layer <= num_layers:
                raise ValueError(f"align.layer={align.layer} out of range 1..{num_layers}")
            init_std = adapter.initializer_range if align.projector_init == "hf" else None
            self.align_head = AlignHead(
                hidden_size, align.feature_dim, align.projector, align.loss, fused_kernels, init_std=init_std
            )
            if align.target == "rep":  # by name (e.g. <reserved08795>); a clear error if the vocabulary lacks it
                if adapter.vocab is None:
                    raise ValueError("align.target=rep needs a text vocabulary with the <REP> token; this backbone has none")
                self.rep_id = adapter.vocab.id(align.rep_token)
            adapter.layer_output(align.layer).register_forward_hook(self._capture_hook)

    @property
    def pad_id(self) -> int:
        """The id the data loader pads sequences with."""
        return self.adapter.pad_id

    def num_parameters(self) -> int:
        """Total parameter count (under ZeRO-3 each parameter's full ``ds_numel``, not the local shard)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())

    def non_embedding_parameters(self) -> int:
        """Parameters without the input embeddings (the N of the FLOPs formula; the LM head is in)."""
        embed = self.adapter.input_embedding
        return self.num_parameters() - getattr(embed, "ds_numel", embed.numel())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the backbone at sequence length ``seq_len`` (for MFU)."""
        adapter = self.adapter
        return training_flops_per_token(self.non_embedding_parameters(), adapter.num_layers, adapter.hidden_size, seq_len)

    def _check_rep_rows(self, labels: torch.Tensor, rep_rows: torch.Tensor) -> None:
        """target=rep: every row with image tokens to learn must hold the <REP> token, or that row would
        silently get no alignment term (data pre-tokenised without it)."""
        has_image = self.image_token_mask[labels.clamp(min=0)].logical_and(labels != IGNORE_INDEX).any(dim=1)  # [B]
        if int(has_image.sum()) > rep_rows.numel():
            raise ConfigError(
                f"align.target=rep: a sample with an image has no {self.align.rep_token} token to align. Pre-tokenise "
                f"with rep_token=true (launch/pretokenize.py), or set align.rep_token=<racm3:break> to align at the image start"
            )

    def _capture_hook(self, module, inputs, output):
        # Activation checkpointing re-runs the layer in backward; capture only in the real forward.
        if self._capturing:
            self._captured = output[0] if isinstance(output, tuple) else output

    def forward(self, batch: dict) -> ARRAOutput:
        self._capturing = self.align_head is not None
        self._captured = None
        try:
            view = self.adapter.run(batch)
        finally:
            self._capturing = False
        layer_hidden, self._captured = self._captured, None
        input_ids = view.input_ids  # [B, T]
        labels = view.labels  # [B, T], unshifted
        hidden = view.hidden  # [B, T-1, H]: positions that predict labels[:, 1:]

        shifted_targets = labels[:, 1:]  # [B, T-1]
        supervised = shifted_targets != IGNORE_INDEX
        lm_loss, ce, z = self.adapter.lm_head(hidden[supervised], targets=shifted_targets[supervised])

        zero = torch.zeros((), device=hidden.device)
        loss_gva, cos, num_aligned = zero, zero, 0
        total = lm_loss
        if self.align_head is not None:
            b_idx, t_idx = aligned_positions(
                input_ids, labels, self.image_token_mask, self.rep_id, self.align.target, self.align.slice_len
            )
            if self.align.target == "rep":
                self._check_rep_rows(labels, b_idx)
            targets = batch["target_features"]  # [B, D]
            if targets.shape[-1] != self.align.feature_dim:
                raise ValueError(
                    f"target_features have width {targets.shape[-1]} but the projector was built for "
                    f"D={self.align.feature_dim} (align.feature_dim)"
                )
            loss_gva, cos = self.align_head(layer_hidden[b_idx, t_idx], b_idx, targets)
            total = total + self.align.weight * loss_gva
            num_aligned = int(b_idx.numel())
        return ARRAOutput(
            loss=total,
            loss_ar=ce,
            loss_gva=loss_gva.detach(),
            loss_z=z,
            cos=cos.detach(),
            num_tokens=int(supervised.sum()),
            num_aligned=num_aligned,
        )


def build_model(
    model_cfg: ModelConfig,
    align_cfg: AlignConfig,
    dtype: torch.dtype = torch.float32,
    gather: GatherContext = no_gather,
    partitioned: PartitionContext = no_partitioning,
) -> ARRAModel:
    """The backbone of ``model_cfg`` wrapped for ARRA; ``align_cfg.feature_dim`` must already hold D (from the data).
    ``gather`` / ``partitioned``: the trainer's ZeRO-3 hooks (``model/interface.py``)."""
    adapter = build_backbone_adapter(model_cfg, dtype=dtype, gather=gather, partitioned=partitioned)
    model = ARRAModel(adapter, align_cfg, model_cfg.fused_kernels)
    if model.align_head is not None:
        model.align_head.to(dtype)
    return model
