"""The global visual alignment loss (ARRA's L_GVA) in torch: the fallback of ``align_loss.py``'s Triton
kernel (``gva_loss``, after the model's own projector) and the pure-torch reference of the whole fused
projector + loss (``reference_projection_loss``).

Shapes: N aligned rows, H backbone width, D projector / feature width, B samples.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["cosine", "mse"]


def gva_loss(
    projected: torch.Tensor,
    sample_idx: torch.Tensor,
    targets: torch.Tensor,
    kind: LossKind = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global visual alignment loss.

    projected [N, D]: A_phi(h) at the aligned positions; sample_idx [N]: which sample each row
    belongs to; targets [B, D]: one global feature per sample. Per row: 1 - cos (or the mean squared
    error for ``kind='mse'``); averaged over a sample's rows, then over the samples that have rows.
    Returns (loss, mean cosine) in fp32; the cosine is detached and averaged the same way.
    """
    batch = targets.shape[0]
    p = projected.float()
    t = targets.float()[sample_idx]  # [N, D]
    cos_rows = (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(-1)  # [N]
    if kind == "cosine":
        row_loss = 1.0 - cos_rows
    elif kind == "mse":
        row_loss = (p - t).square().mean(-1)
    else:
        raise ValueError(f"unknown alignment loss {kind!r}; use 'cosine' or 'mse'")

    counts = torch.bincount(sample_idx, minlength=batch).to(p.dtype)  # [B]
    has_rows = counts > 0
    if not bool(has_rows.any()):
        zero = projected.sum().float() * 0.0
        return zero, zero.detach()
    per_sample_loss = torch.zeros(batch, dtype=p.dtype, device=p.device).index_add(0, sample_idx, row_loss)
    per_sample_cos = torch.zeros(batch, dtype=p.dtype, device=p.device).index_add(0, sample_idx, cos_rows.detach())
    loss = (per_sample_loss[has_rows] / counts[has_rows]).mean()
    cos = (per_sample_cos[has_rows] / counts[has_rows]).mean()
    return loss, cos


def reference_projection_loss(
    hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind: LossKind = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch, autograd throughout: AlignHead's mlp projector followed by ``gva_loss``.

    Computes in the dtype of its inputs; tests pass fp32 copies for the fp32-accumulation reference.
    """
    projected = F.linear(F.gelu(F.linear(hidden, fc1_w, fc1_b)), fc2_w, fc2_b)  # [N, D]
    loss, cos = gva_loss(projected, sample_idx, target.detach(), kind)
    if hidden.shape[0] == 0:
        loss = loss + (fc1_w.sum() + fc1_b.sum() + fc2_w.sum() + fc2_b.sum()).float() * 0.0
    return loss, cos


def reference_projection_cosine_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b) -> torch.Tensor:
    return reference_projection_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, "cosine")[0]
