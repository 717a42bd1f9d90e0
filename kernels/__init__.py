"""Fused Triton kernels, each beside its ``torch.autograd.Function`` and its torch counterpart.

    lm_loss.py          LM head + cross-entropy + z-loss without [N, V] fp32 logits (Triton)
    lm_loss_torch.py    the same loss chunked in torch (the fallback) and the full-logits reference
    align_loss.py       projector MLP (Linear - exact GELU - Linear) + cosine / MSE alignment loss (Triton)
    align_loss_torch.py ``gva_loss`` (the fallback, after the model's projector) and the whole reference
    modes.py            ``model.fused_kernels`` (auto / on / off): which of the two runs

Installed as ``arra_ds.kernels`` (``arra_ds/kernels`` is a link to this folder). The model calls
``lm_head_loss`` and ``projection_alignment_loss`` below; they import a Triton module only where its
kernel runs. Triton decides at *decoration* time whether ``@triton.jit`` compiles for the GPU or runs
in the CPU interpreter (``TRITON_INTERPRET=1``), both for our kernels and for triton.language's own
helpers, which torch imports lazily; so the variable must be set at process start.
"""

from __future__ import annotations

import torch

from arra_ds.kernels.align_loss_torch import LossKind, gva_loss
from arra_ds.kernels.lm_loss_torch import chunked_lm_loss
from arra_ds.kernels.modes import (
    ALIGN_MAX_FEATURE_DIM,
    FUSED_KERNEL_MODES,
    check_launchable,
    triton_interpreter_enabled,
    use_fused_kernel,
)

__all__ = [
    "ALIGN_MAX_FEATURE_DIM", "FUSED_KERNEL_MODES", "check_launchable", "gva_loss", "lm_head_loss", "projection_alignment_loss",
    "triton_interpreter_enabled", "use_fused_kernel",
]


def lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss_weight: float, chunk_size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, z) of the LM head over already-shifted, already-filtered rows.

    hidden [N, H], weight [V, H], targets [N]; ce and the unweighted z are detached, for logging.
    """
    if use_fused_kernel(mode, hidden):
        from arra_ds.kernels.lm_loss import fused_lm_loss  # imports Triton: only where the kernel runs

        return fused_lm_loss(hidden, weight, targets, z_loss_weight, chunk_size)
    return chunked_lm_loss(hidden, weight, targets, z_loss_weight, chunk_size)


def projection_alignment_loss(
    hidden: torch.Tensor,
    sample_idx: torch.Tensor,
    targets: torch.Tensor,
    fc1: torch.nn.Linear,
    fc2: torch.nn.Linear,
    kind: LossKind,
    mode: str,
    target_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean cosine, first-row cosine) of the mlp projector fc2(gelu(fc1(h))) against the targets.

    hidden [N, H], sample_idx [N]; targets [B, D], one per sample, or with ``target_idx`` [N] any
    [M, D] (row n against targets[target_idx[n]]: the per-position targets of align.feature=patch).
    The Triton kernel never stores the [N, D] projections; it takes D <= ALIGN_MAX_FEATURE_DIM (wider
    projectors run the torch code under auto).
    """
    if fc1.out_features <= ALIGN_MAX_FEATURE_DIM and use_fused_kernel(mode, hidden):
        from arra_ds.kernels.align_loss import fused_projection_loss  # imports Triton: only where the kernel runs

        return fused_projection_loss(
            hidden, sample_idx, targets, fc1.weight, fc1.bias, fc2.weight, fc2.bias, kind, target_idx=target_idx
        )
    projected = fc2(torch.nn.functional.gelu(fc1(hidden)))  # [N, D]
    return gva_loss(projected, sample_idx, targets, kind, target_idx)
