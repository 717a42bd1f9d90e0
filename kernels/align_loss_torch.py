"""The global visual alignment loss (ARRA's L_GVA) in torch: the fallback of ``align_loss.py``'s Triton
kernel (``gva_loss``, after the model's own projector) and the pure-torch reference of the whole fused
projector + loss (``reference_projection_loss``).

Shapes: N aligned rows, H backbone width, D projector / feature width, B samples, M target rows.

Targets: row n is compared with ``targets[target_idx[n]]``. Without ``target_idx`` that is
``targets[sample_idx[n]]``, one global feature per sample (``targets`` [B, D], the paper); the
spatial mode (``align.feature=patch``) gives every row its own target (``targets`` [N, D],
``target_idx = arange(N)``). Either way the loss is averaged over a sample's rows, then over samples.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["cosine", "mse"]


def first_row_of_each_sample(sample_idx: torch.Tensor) -> torch.Tensor:
    """Index of the first row (lowest row number) of every sample that has rows, in sample order [S].

    The model passes rows in position order, so this is each image's first aligned position.
    """
    num_rows = sample_idx.numel()
    if num_rows == 0:
        return sample_idx.new_zeros(0)
    rows = torch.arange(num_rows, device=sample_idx.device)
    counts = torch.bincount(sample_idx)
    first = torch.full((counts.numel(),), num_rows, dtype=rows.dtype, device=rows.device)
    first = first.scatter_reduce(0, sample_idx, rows, reduce="amin")
    return first[counts > 0]


def first_row_mean(row_values: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the value at each sample's first row (``cos_first``); 0 without rows."""
    if row_values.numel() == 0:
        return row_values.new_zeros(())
    return row_values[first_row_of_each_sample(sample_idx)].mean()


def gva_loss(
    projected: torch.Tensor,
    sample_idx: torch.Tensor,
    targets: torch.Tensor,
    kind: LossKind = "cosine",
    target_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global visual alignment loss.

    projected [N, D]: A_phi(h) at the aligned positions; sample_idx [N]: which sample each row
    belongs to; targets [M, D] with ``target_idx`` [N] (default: ``sample_idx``, M = B). Per row:
    1 - cos (or the mean squared error for ``kind='mse'``); averaged over a sample's rows, then over
    the samples that have rows. Returns (loss, mean cosine, first-row cosine) in fp32; both cosines
    are detached; the mean cosine is averaged like the loss, the first-row cosine is the mean over
    samples of the cosine at each sample's first row.
    """
    p = projected.float()
    t = targets.float()[sample_idx if target_idx is None else target_idx]  # [N, D]
    cos_rows = (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(-1)  # [N]
    if kind == "cosine":
        row_loss = 1.0 - cos_rows
    elif kind == "mse":
        row_loss = (p - t).square().mean(-1)
    else:
        raise ValueError(f"unknown alignment loss {kind!r}; use 'cosine' or 'mse'")

    counts = torch.bincount(sample_idx).to(p.dtype)  # [max sample + 1]
    has_rows = counts > 0
    if not bool(has_rows.any()):
        zero = projected.sum().float() * 0.0
        return zero, zero.detach(), zero.detach()
    slots = counts.numel()
    per_sample_loss = torch.zeros(slots, dtype=p.dtype, device=p.device).index_add(0, sample_idx, row_loss)
    per_sample_cos = torch.zeros(slots, dtype=p.dtype, device=p.device).index_add(0, sample_idx, cos_rows.detach())
    loss = (per_sample_loss[has_rows] / counts[has_rows]).mean()
    cos = (per_sample_cos[has_rows] / counts[has_rows]).mean()
    return loss, cos, first_row_mean(cos_rows.detach(), sample_idx)


def reference_projection_loss(
    hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind: LossKind = "cosine", target_idx=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure torch, autograd throughout: AlignHead's mlp projector followed by ``gva_loss``.

    Computes in the dtype of its inputs; tests pass fp32 copies for the fp32-accumulation reference.
    """
    projected = F.linear(F.gelu(F.linear(hidden, fc1_w, fc1_b)), fc2_w, fc2_b)  # [N, D]
    loss, cos, cos_first = gva_loss(projected, sample_idx, target.detach(), kind, target_idx)
    if hidden.shape[0] == 0:
        loss = loss + (fc1_w.sum() + fc1_b.sum() + fc2_w.sum() + fc2_b.sum()).float() * 0.0
    return loss, cos, cos_first


def reference_projection_cosine_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b) -> torch.Tensor:
    return reference_projection_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, "cosine")[0]
