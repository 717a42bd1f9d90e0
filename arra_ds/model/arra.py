"""The ARRA model: a backbone, the alignment projector A_phi and the combined loss.

    L = L_AR + z_w * L_z + lambda * L_GVA

L_AR and L_z come from the chunked LM head (never [B, T, V] logits). L_GVA aligns the output of
decoder layer ``align.layer`` (Hugging Face ``hidden_states[layer]``, captured with a forward hook)
at the aligned positions with one global feature per sample (``align.feature=global``, the paper) or,
with ``align.feature=patch``, with the encoder's patch feature at the place of the code each position
predicts (``patch_alignment_targets``). The projector is training-only.

lambda follows ``align.schedule`` / ``warmup_steps`` / ``stop_step`` (``AlignConfig.align_weight_at``, a
pure function of the optimizer step); the trainer calls ``ARRAModel.set_align_step`` before every
update. Once lambda is 0 for good, the layer hook and the projector are skipped on every rank.

The backbone is reached through a ``BackboneAdapter`` (``model/interface.py``) that the backbone of
``model.source`` builds (``model/registry.py``): Chameleon / Lumina-mGPT / debug or LlamaGen's GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from arra_ds.errors import ConfigError
from arra_ds.kernels import ALIGN_MAX_FEATURE_DIM, gva_loss, projection_alignment_loss
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import BackboneAdapter, GatherContext, PartitionContext, no_gather, no_partitioning
from arra_ds.model.trainable import HeadRows, LoraConfig, TrainableSummary, apply_trainable, trains_image_rows
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
    encoder: str = "biomedclip"  # the data column feat_<encoder> (or patch_<encoder>) holds the target features
    # global: one feature per image (feat_<encoder>, the paper); patch: every aligned position against the
    # encoder's patch feature at the place of its code (patch_<encoder>, written by pre-tokenization with
    # patch_features=true; needs align.target=hybnext)
    feature: Literal["global", "patch"] = "global"  # global: feat_<encoder>; patch: patch_<encoder> at each code's place
    # feature=patch: the state that predicts code i is aligned with patch i - patch_offset (raster order, the
    # encoder's grid resampled to the code grid): 1 = the code it has just read (Mirai's matched position; the
    # first code's state is left out), 0 = the code it predicts
    patch_offset: int = 1  # feature=patch: the state predicting code i is aligned with patch i - patch_offset
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # lambda: constant or a linear / cosine decay to 0
    warmup_steps: int = 0  # lambda ramps linearly from 0 over these first steps (then follows align.schedule)
    stop_step: int = 0  # lambda = 0 from this optimizer step on and the projector is skipped (HASTE); 0 = never
    feature_dim: int = 0  # D; 0 = read from the data (the trainer fills it in)

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def feature_column(self) -> str:
        """The data column of the targets (``arra_ds.data.schema`` names them the same way)."""
        return f"{'patch' if self.feature == 'patch' else 'feat'}_{self.encoder}"

    def alignment_ends_at(self, max_steps: int) -> int:
        """The first optimizer step (0-based) from which lambda is 0 for good: 0 for an AR-only run,
        ``stop_step`` when it falls inside the run, else ``max_steps`` (the decays reach 0 only there)."""
        if not self.enabled:
            return 0
        if 0 < self.stop_step < max_steps:
            return self.stop_step
        return max_steps

    def alignment_ended(self, step: int, max_steps: int) -> bool:
        """Whether lambda is 0 at ``step`` and at every later step of a ``max_steps`` run."""
        return step >= self.alignment_ends_at(max_steps)

    def align_weight_at(self, step: int, max_steps: int) -> float:
        """lambda for optimizer step ``step``: 0-based, the update about to be taken (the first update of
        a run is step 0; metrics.jsonl logs it as step 1), in a run of ``max_steps`` updates.

        Warm-up: ``weight * (step + 1) / warmup_steps`` for step < warmup_steps (as the learning rate's
        warm-up). Then ``constant``: weight; ``linear`` / ``cosine``: from weight down to 0 at max_steps,
        progress = (step - warmup_steps) / (max_steps - warmup_steps). 0 from ``stop_step`` on. A pure
        function of the step: a resumed run (on any number of ranks) follows the same curve.
        """
        if self.alignment_ended(step, max_steps):
            return 0.0
        if step < self.warmup_steps:
            return self.weight * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.weight
        progress = min(max(step - self.warmup_steps, 0) / max(max_steps - self.warmup_steps, 1), 1.0)
        if self.schedule == "linear":
            return self.weight * (1.0 - progress)
        return self.weight * 0.5 * (1.0 + math.cos(math.pi * progress))

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
        if self.feature == "patch" and self.target != "hybnext":
            raise ConfigError(
                f"align.feature=patch aligns every position with the patch of its code; align.target={self.target} "
                "has no code positions: use align.target=hybnext"
            )
        if self.patch_offset not in (0, 1):
            raise ConfigError(
                f"align.patch_offset={self.patch_offset} must be 1 (the code just read) or 0 (the code predicted)"
            )
        if self.warmup_steps < 0 or self.stop_step < 0:
            raise ConfigError(
                f"align.warmup_steps={self.warmup_steps} and align.stop_step={self.stop_step} must be >= 0 "
                "(stop_step=0: never stop)"
            )


def training_flops_per_token(num_params_no_embedding: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs per token of a decoder-only transformer (PaLM appendix B), forward + backward:

        6 * N + 12 * L * H * T

    N counts every parameter except the input embeddings (the LM head is in), L layers, H hidden
    size, T the sequence length (the attention score and value matmuls); recompute is not counted.
    """
    return 6.0 * num_params_no_embedding + 12.0 * num_layers * hidden_size * seq_len


class AlignHead(nn.Module):
    """A_phi: [N, H] -> [N, D] and the GVA loss against one target per sample (or per row).

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

    def forward(
        self, hidden: torch.Tensor, sample_idx: torch.Tensor, targets: torch.Tensor, target_idx: torch.Tensor | None = None
    ):
        # hidden [N, H], sample_idx [N], targets [B, D] (or [M, D] with target_idx [N]: row n against
        # targets[target_idx[n]]) -> (loss, mean cosine, cosine at each sample's first row)
        # With no rows, fc1/fc2 still run on the empty [0, H] input and the loss is a zero tied to
        # their outputs, so they stay in the graph and every rank runs the same ZeRO-3 collectives in
        # backward. (Touching self.parameters() directly instead would see ZeRO-3's empty partitions:
        # a submodule's weights are gathered only while it is called.)
        if self.projector == "mlp":
            return projection_alignment_loss(
                hidden, sample_idx, targets, self.fc1, self.fc2, self.loss_kind, self.fused_kernels, target_idx
            )
        return gva_loss(self.project(hidden), sample_idx, targets, self.loss_kind, target_idx)


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


def rows_per_sample_rank(sample_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """[N]: the rank of each row among its sample's rows (0, 1, ...); rows are grouped by sample in
    ascending order, as ``aligned_positions`` returns them."""
    counts = torch.bincount(sample_idx, minlength=batch)  # [B]
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sample_idx.numel(), device=sample_idx.device) - starts[sample_idx]


def resample_patch_grid(patches: torch.Tensor, patch_grid: tuple[int, int], code_grid: tuple[int, int]) -> torch.Tensor:
    """Encoder patch features [B, gh * gw, D] (raster order) -> [B, h * w, D] on the h x w code grid (fp32).

    Patches and codes are cells tiling the same picture. A code grid as coarse as the patch grid or
    coarser: area interpolation, each code gets the mean of the patches it covers (e.g. SAM's 64 x 64
    neck for 32 x 32 codes); equal grids are copied unchanged. A finer code grid: bilinear with
    align_corners=False (cell centres matched by position), a code between patch centres gets the
    distance-weighted blend of its neighbours rather than a blocky copy (e.g. DINOv2's 16 x 16 at 224 px
    for 32 x 32 codes at 512 px). REPA and Mirai avoid the question by running the encoder at the
    resolution whose grid equals the token grid; pre-computed features cannot, and resampling keeps any
    encoder usable.
    """
    batch, _, dim = patches.shape
    grid_h, grid_w = patch_grid
    code_h, code_w = code_grid
    grid = patches.float().reshape(batch, grid_h, grid_w, dim).permute(0, 3, 1, 2)  # [B, D, gh, gw]
    if code_h <= grid_h and code_w <= grid_w:
        grid = F.interpolate(grid, size=(code_h, code_w), mode="area")
    else:  # antialias only acts along a side that shrinks
        grid = F.interpolate(grid, size=(code_h, code_w), mode="bilinear", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(batch, code_h * code_w, dim)


def patch_alignment_targets(
    patches: torch.Tensor,
    patch_grid: tuple[int, int],
    code_grids: torch.Tensor,
    sample_idx: torch.Tensor,
    patch_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [N] bool, targets [N_kept, D]) for ``align.feature=patch``.

    patches [B, P, D]: the encoder's patch features (P = gh * gw); code_grids [B, 2]: each sample's code
    grid (h, w); sample_idx [N]: the sample of each aligned row, rows of a sample in position order, so
    the k-th row of a sample predicts code k (raster order: newline tokens are not aligned rows). That
    row is aligned with code k - patch_offset of the resampled grid; rows with k - patch_offset < 0 are
    dropped (``keep``).
    """
    code_index = rows_per_sample_rank(sample_idx, patches.shape[0])  # [N]: the code each row predicts
    source = code_index - patch_offset  # [N]: the code whose patch it is aligned with
    row_grids = code_grids[sample_idx]  # [N, 2]
    if bool((code_index >= row_grids[:, 0] * row_grids[:, 1]).any()):
        raise ValueError("a sample has more aligned image-code positions than its code grid (h x w) holds")
    keep = source >= 0
    targets = patches.new_zeros((sample_idx.numel(), patches.shape[-1]), dtype=torch.float32)
    for code_h, code_w in sorted({tuple(g) for g in row_grids[keep].tolist()}):
        rows = keep & (row_grids[:, 0] == code_h) & (row_grids[:, 1] == code_w)
        resampled = resample_patch_grid(patches, patch_grid, (code_h, code_w))  # [B, h * w, D]
        targets[rows] = resampled[sample_idx[rows], source[rows]]
    return keep, targets[keep]


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
    # mean over images of the cosine at each image's first aligned position (detached): the position that
    # predicts the first code and has seen only the condition (with align.feature=patch and patch_offset=1,
    # the first position with a target: the one that has read code 0). Close to cos = the target is
    # predictable from the condition alone
    cos_first: torch.Tensor
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
        # lambda of the next forward and whether the projector runs at all (``set_align_step``)
        self.align_weight = align.weight
        self.align_active = align.enabled
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

    def set_align_step(self, step: int, max_steps: int) -> float:
        """Set lambda for optimizer step ``step`` (0-based, the update about to be taken) of a ``max_steps``
        run; returns it (the ``align_weight`` to log). Call it before that step's first forward, on every rank.

        From ``align.alignment_ends_at(max_steps)`` on, lambda is 0 for good: the forward skips the layer
        hook and the projector (no compute, no ZeRO-3 gather), and the projector's parameters get
        requires_grad=False. The step decides it, so every rank decides the same and ZeRO-3's collectives
        stay matched. The freeze matters under ZeRO-3 (DeepSpeed 0.19): a parameter that gets no gradient
        keeps its last reduced gradient in the optimizer's flat gradient buffer, which the optimizer would
        apply again at every step and count in the clipped global norm; with requires_grad=False its
        gradient is zeros. Call it only after the optimizer is built (its groups hold the projector).
        """
        weight = self.align.align_weight_at(step, max_steps)
        active = self.align_head is not None and not self.align.alignment_ended(step, max_steps)
        if self.align_head is not None:
            self.align_head.requires_grad_(active)
        self.align_weight, self.align_active = weight, active
        return weight

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

    def _code_grids(self, input_ids: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """[B, 2] int64: the code grid (h, w) of each sample in ``samples`` (the others 0 x 0), as the backbone's
        sequence layout says (``BackboneAdapter.code_grid``)."""
        grids = torch.zeros((labels.shape[0], 2), dtype=torch.long)
        for b in samples.tolist():
            grids[b] = torch.tensor(self.adapter.code_grid(input_ids[b], labels[b]))
        return grids.to(labels.device)

    def _patch_rows(self, batch: dict, input_ids: torch.Tensor, labels: torch.Tensor, b_idx: torch.Tensor):
        """align.feature=patch: (keep [N] bool, targets [N_kept, D]) for the aligned rows ``b_idx``."""
        if "target_patches" not in batch:
            raise ValueError(
                "align.feature=patch needs batch['target_patches'] [B, P, D] and batch['patch_grid'] (the loader "
                f"collates them from the data column {self.align.feature_column})"
            )
        patches = batch["target_patches"]  # [B, P, D]
        grid_h, grid_w = (int(v) for v in batch["patch_grid"].tolist())
        code_grids = self._code_grids(input_ids, labels, torch.unique(b_idx))
        return patch_alignment_targets(patches, (grid_h, grid_w), code_grids, b_idx, self.align.patch_offset)

    def forward(self, batch: dict) -> ARRAOutput:
        use_align = self.align_head is not None and self.align_active
        self._capturing = use_align
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
        loss_gva, cos, cos_first, num_aligned = zero, zero, zero, 0
        total = lm_loss
        if use_align:
            b_idx, t_idx = aligned_positions(
                input_ids, labels, self.image_token_mask, self.rep_id, self.align.target, self.align.slice_len
            )
            if self.align.target == "rep":
                self._check_rep_rows(labels, b_idx)
            target_idx = None
            if self.align.feature == "patch":
                keep, targets = self._patch_rows(batch, input_ids, labels, b_idx)  # targets [N_kept, D]
                b_idx, t_idx = b_idx[keep], t_idx[keep]
                target_idx = torch.arange(b_idx.numel(), device=b_idx.device)  # one target row per aligned row
            else:
                targets = batch["target_features"]  # [B, D]
            if targets.shape[-1] != self.align.feature_dim:
                raise ValueError(
                    f"the target features have width {targets.shape[-1]} but the projector was built for "
                    f"D={self.align.feature_dim} (align.feature_dim)"
                )
            loss_gva, cos, cos_first = self.align_head(layer_hidden[b_idx, t_idx], b_idx, targets, target_idx)
            total = total + self.align_weight * loss_gva
            num_aligned = int(b_idx.numel())
        return ARRAOutput(
            loss=total,
            loss_ar=ce,
            loss_gva=loss_gva.detach(),
            loss_z=z,
            cos=cos.detach(),
            cos_first=cos_first.detach(),
            num_tokens=int(supervised.sum()),
            num_aligned=num_aligned,
        )


def resolved_lora(model_cfg: ModelConfig) -> LoraConfig:
    """``model.lora`` with ``target_modules=[]`` resolved to the backbone's Linear layers (``Architecture``)."""
    if model_cfg.lora.target_modules:
        return model_cfg.lora
    return replace(model_cfg.lora, target_modules=list(model_cfg.backbone.architecture(model_cfg).lora_targets))


def apply_model_trainable(module: nn.Module, model_cfg: ModelConfig) -> TrainableSummary:
    """``model.trainable`` on the backbone module (``model/trainable.py``): freeze, add LoRA / the image-row delta."""
    head = None
    if trains_image_rows(model_cfg.trainable, model_cfg.lora):
        architecture = model_cfg.backbone.architecture(model_cfg)
        head = HeadRows(architecture.head, architecture.image_rows)
    return apply_trainable(module, model_cfg.trainable, resolved_lora(model_cfg), head)


def training_skeleton(model_cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The backbone module exactly as ``build_model`` trains it (LoRA layers and the head-row delta included), its
    parameters on the meta device: the in-training evaluation copies the training weights into it."""
    module = model_cfg.backbone.skeleton(model_cfg, dtype)
    apply_model_trainable(module, model_cfg)
    return module


def build_model(
    model_cfg: ModelConfig,
    align_cfg: AlignConfig,
    dtype: torch.dtype = torch.float32,
    gather: GatherContext = no_gather,
    partitioned: PartitionContext = no_partitioning,
) -> ARRAModel:
    """The backbone of ``model_cfg`` wrapped for ARRA; ``align_cfg.feature_dim`` must already hold D (from the data).
    ``gather`` / ``partitioned``: the trainer's ZeRO-3 hooks (``model/interface.py``)."""
    adapter = model_cfg.backbone.build(model_cfg, dtype, gather, partitioned)
    # LoRA adapters / the head-row delta are created here, outside zero.Init: they are small, and DeepSpeed
    # partitions them (rank 0's values) when the engine is built; inside zero.Init peft's zero init of lora_B would
    # run on an empty partition
    apply_model_trainable(adapter.module, model_cfg)
    model = ARRAModel(adapter, align_cfg, model_cfg.fused_kernels)
    if model.align_head is not None:
        model.align_head.to(dtype)
    return model
