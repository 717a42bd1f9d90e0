"""Fused projector MLP + alignment loss (ARRA's L_GVA), Triton forward and backward.

    p_n  = W2 gelu(W1 h_n + b1) + b2                  (exact erf GELU, as nn.functional.gelu)
    cos_n = <p_n, t_n> / (max(|p_n|, eps) max(|t_n|, eps))   (F.normalize on both sides)
    loss = 1 - mean_b mean_{n in b} cos_n             (kind="cosine")
    loss =     mean_b mean_{n in b} mean_d (p_nd - t_nd)^2   (kind="mse")

over the samples b that own at least one row, with t_n = target[target_idx[n]]: by default
target_idx = sample_idx (one global target per sample, target [B, D]); the spatial mode passes one
target row per aligned row (target [N, D], target_idx = arange(N)). The mean cosine and the cosine at
each sample's first row (``cos_first``) are returned too, for logging. This is
``arra_ds.model.arra.AlignHead`` (mlp projector) followed by ``align_loss_torch.gva_loss``;
``align_loss_torch.reference_projection_loss`` is exactly that torch code (re-exported here).

Shapes: N aligned rows, H backbone width, D projector width, B samples, M target rows.

Forward kernel (one program per BLOCK_N rows): fc1 as a tl.dot loop over H into a [BLOCK_N, D]
fp32 tile, bias + GELU in registers, fc2 in BLOCK_J column slices with the per-row dot products
<p, t>, |p|^2 (and the squared error) reduced on the fly, so p is never written. Only the fc1
pre-activation [N, D] fp32 and three [N] fp32 row statistics are stored for backward.

Backward kernel (same row blocks): recomputes gelu and p from the stored pre-activation (one D x D
matmul, an eighth of fc1's H x D at H = 8 D), forms dL/dp from the row statistics, and writes
dL/dp, dL/d(pre-activation) and gelu(pre-activation) [N, D] each in the parameter dtype. The three
large matmuls that need a reduction over N or an [N, H] output (dL/dh = dA W1, dL/dW1 = dA^T h,
dL/dW2 = dP^T gelu) go to cuBLAS through torch: nothing is left to fuse into them.

All reductions and the loss epilogue run in fp32; matmul operands are in the parameter dtype
(bf16 on GPU runs) with fp32 accumulation. fp32 inputs use IEEE fp32 dots (no TF32), to match
torch's default matmul precision.

CPU: ``TRITON_INTERPRET=1`` set before Triton is first imported (torch imports triton.language
lazily, so: at process start; tests/conftest.py does) runs the kernels in Triton's interpreter.
The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584), so there every
dot operand is rounded to the parameter dtype first and then widened to fp32: the same
values a bf16 tensor-core dot multiplies, in a dtype the interpreter handles. The interpreter also
rounds fp32 -> bf16 casts toward zero where the GPU rounds to nearest even, so bf16 results on CPU
carry up to one more bf16 ulp of error than on the GPU (tests/test_kernels.py's bf16 tolerance
covers both).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from arra_ds.kernels.modes import ALIGN_MAX_FEATURE_DIM, check_launchable
from arra_ds.kernels.align_loss_torch import (
    LossKind, first_row_mean, reference_projection_cosine_loss, reference_projection_loss,
)

__all__ = [
    "fused_projection_loss", "fused_projection_cosine_loss", "ProjectionLossFunction",
    "reference_projection_loss", "reference_projection_cosine_loss",
]

# Whether this module's kernels were decorated for the CPU interpreter (decided at import time).
INTERPRETED = bool(triton.knobs.runtime.interpret)
NORM_EPS = 1e-12  # F.normalize's default eps
FC1_BLOCK_H = 32  # fc1's reduction step over H: a [D, FC1_BLOCK_H] slice of W1 per pipeline stage
FC2_BLOCK_J = 64  # fc2 output columns per step: a [FC2_BLOCK_J, D] slice of W2
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _gelu(x):
    # exact GELU: x * Phi(x)
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    # d/dx [x Phi(x)] = Phi(x) + x phi(x)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def _dot_operand(x, IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # round to the parameter dtype (what a bf16 matmul sees), then to the dtype tl.dot runs in
    return x.to(IO_DTYPE).to(DOT_DTYPE)


@triton.jit
def _projection_loss_forward_kernel(
    hidden_ptr,  # [N, H] parameter dtype
    target_idx_ptr,  # [N] int64: the target row of each row
    target_ptr,  # [M, D] any float dtype
    target_norm_ptr,  # [M] fp32 |t_m|
    fc1_w_ptr,  # [D, H]
    fc1_b_ptr,  # [D]
    fc2_w_ptr,  # [D, D] (out, in)
    fc2_b_ptr,  # [D]
    pre_act_ptr,  # out [N, D] fp32: W1 h + b1
    cos_ptr,  # out [N] fp32
    proj_norm_ptr,  # out [N] fp32 |p_n| (unclamped)
    sq_err_ptr,  # out [N] fp32 mean_d (p - t)^2 (written for MSE only)
    N,
    H,
    D,
    EPS: tl.constexpr,
    IS_MSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    io_dtype = hidden_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    feat = tl.arange(0, BLOCK_D)
    feat_ok = feat < D

    # fc1: [BLOCK_N, H] @ [H, D] accumulated in fp32; padded rows / features load zeros
    pre_act = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        h_tile = tl.load(
            hidden_ptr + rows64[:, None] * H + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        w1_tile = tl.load(  # [BLOCK_D, BLOCK_H] slice of W1, read along its contiguous H axis
            fc1_w_ptr + feat[:, None].to(tl.int64) * H + cols[None, :],
            mask=feat_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        pre_act = tl.dot(h_tile.to(DOT_DTYPE), tl.trans(w1_tile.to(DOT_DTYPE)), pre_act, input_precision=DOT_PRECISION)
    pre_act += tl.load(fc1_b_ptr + feat, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    tile_ok = row_ok[:, None] & feat_ok[None, :]
    tl.store(pre_act_ptr + rows64[:, None] * D + feat[None, :], pre_act, mask=tile_ok)
    act = _dot_operand(_gelu(pre_act), io_dtype, DOT_DTYPE)  # [BLOCK_N, BLOCK_D]; padded features are gelu(0) = 0

    target_row = tl.load(target_idx_ptr + rows, mask=row_ok, other=0)
    dot_pt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dot_pp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq_err = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # fc2 one BLOCK_J-wide output slice at a time; p is reduced into row statistics, never stored
    for j_start in range(0, D, BLOCK_J):
        out = j_start + tl.arange(0, BLOCK_J)
        out_ok = out < D
        w2_tile = tl.load(  # [BLOCK_J, BLOCK_D]: the W2 rows of this output slice
            fc2_w_ptr + out[:, None] * D + feat[None, :], mask=out_ok[:, None] & feat_ok[None, :], other=0.0
        ).to(DOT_DTYPE)
        proj = tl.dot(act, tl.trans(w2_tile), input_precision=DOT_PRECISION)
        proj += tl.load(fc2_b_ptr + out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        target = tl.load(
            target_ptr + target_row[:, None] * D + out[None, :], mask=row_ok[:, None] & out_ok[None, :], other=0.0
        ).to(tl.float32)
        dot_pt += tl.sum(proj * target, axis=1)
        dot_pp += tl.sum(proj * proj, axis=1)
        if IS_MSE:
            diff = proj - target  # padded outputs: 0 - 0
            sq_err += tl.sum(diff * diff, axis=1)

    proj_norm = tl.sqrt(dot_pp)
    target_norm = tl.load(target_norm_ptr + target_row, mask=row_ok, other=1.0)
    cos = dot_pt / (tl.maximum(proj_norm, EPS) * tl.maximum(target_norm, EPS))
    tl.store(cos_ptr + rows, cos, mask=row_ok)
    tl.store(proj_norm_ptr + rows, proj_norm, mask=row_ok)
    if IS_MSE:
        tl.store(sq_err_ptr + rows, sq_err / D, mask=row_ok)


@triton.jit
def _projection_loss_backward_kernel(
    pre_act_ptr,  # [N, D] fp32 from forward
    target_idx_ptr,  # [N] int64
    target_ptr,  # [M, D]
    target_norm_ptr,  # [M] fp32
    fc2_w_ptr,  # [D, D] parameter dtype
    fc2_b_ptr,  # [D]
    cos_ptr,  # [N] fp32 from forward
    proj_norm_ptr,  # [N] fp32 from forward
    row_grad_ptr,  # [N] fp32: dL/dcos_n (cosine) or dL/d(mean sq err)_n (mse)
    act_ptr,  # out [N, D] parameter dtype: gelu(pre-activation), for dL/dW2
    grad_proj_ptr,  # out [N, D] parameter dtype: dL/dp
    grad_pre_ptr,  # out [N, D] parameter dtype: dL/d(pre-activation)
    N,
    D,
    EPS: tl.constexpr,
    IS_MSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    io_dtype = act_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    feat = tl.arange(0, BLOCK_D)
    feat_ok = feat < D
    tile_ok = row_ok[:, None] & feat_ok[None, :]

    tile_offsets = rows64[:, None] * D + feat[None, :]
    act_io = _gelu(tl.load(pre_act_ptr + tile_offsets, mask=tile_ok, other=0.0)).to(io_dtype)
    tl.store(act_ptr + tile_offsets, act_io, mask=tile_ok)
    act = act_io.to(DOT_DTYPE)

    target_row = tl.load(target_idx_ptr + rows, mask=row_ok, other=0)
    row_grad = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0)  # 0 on padded rows: no gradient
    cos = tl.load(cos_ptr + rows, mask=row_ok, other=0.0)
    proj_norm = tl.load(proj_norm_ptr + rows, mask=row_ok, other=1.0)
    proj_norm_c = tl.maximum(proj_norm, EPS)
    target_norm_c = tl.maximum(tl.load(target_norm_ptr + target_row, mask=row_ok, other=1.0), EPS)
    # d cos / d p = (t / |t|_c - cos * p / |p|_c * [|p| >= eps]) / |p|_c : below eps the clamp is
    # constant and the radial term vanishes (as in F.normalize's clamp_min backward)
    radial = tl.where(proj_norm >= EPS, cos / proj_norm_c, 0.0)

    grad_act = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j_start in range(0, D, BLOCK_J):
        out = j_start + tl.arange(0, BLOCK_J)
        out_ok = out < D
        out_tile_ok = row_ok[:, None] & out_ok[None, :]
        w2_tile = tl.load(  # [BLOCK_J, BLOCK_D]: the W2 rows of this output slice, used by both dots
            fc2_w_ptr + out[:, None] * D + feat[None, :], mask=out_ok[:, None] & feat_ok[None, :], other=0.0
        ).to(DOT_DTYPE)
        proj = tl.dot(act, tl.trans(w2_tile), input_precision=DOT_PRECISION)
        proj += tl.load(fc2_b_ptr + out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        target = tl.load(target_ptr + target_row[:, None] * D + out[None, :], mask=out_tile_ok, other=0.0).to(tl.float32)
        if IS_MSE:
            grad_proj = row_grad[:, None] * (2.0 / D) * (proj - target)
        else:
            grad_proj = (
                row_grad[:, None]
                * (target / target_norm_c[:, None] - radial[:, None] * proj)
                / proj_norm_c[:, None]
            )
        grad_proj_io = grad_proj.to(io_dtype)
        tl.store(grad_proj_ptr + rows64[:, None] * D + out[None, :], grad_proj_io, mask=out_tile_ok)
        grad_act = tl.dot(grad_proj_io.to(DOT_DTYPE), w2_tile, grad_act, input_precision=DOT_PRECISION)

    # re-read the pre-activation (from L2) rather than keep a second [BLOCK_N, BLOCK_D] fp32 tile
    # live in registers through the loop
    pre_act = tl.load(pre_act_ptr + tile_offsets, mask=tile_ok, other=0.0)
    grad_pre = grad_act * _gelu_grad(pre_act)
    tl.store(grad_pre_ptr + tile_offsets, grad_pre.to(io_dtype), mask=tile_ok)


def _dot_settings(io_dtype: torch.dtype) -> dict:
    dot_dtype = tl.float32 if INTERPRETED else _TRITON_DTYPES[io_dtype]
    # "ieee" keeps fp32 dots exact fp32 (no TF32); for bf16/fp16 operands the setting is unused
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32")


# Tile sizes per padded projector width BLOCK_D: (forward BLOCK_N, forward warps, backward BLOCK_N,
# backward warps). Chosen from ahead-of-time sm_90 compiles (bench/kernel_resources.py): forward
# tiles of 64 rows get Hopper wgmma for the fc1 matmul (448 B of spill traffic at D = 512); the
# backward tiles are the largest without spills up to D = 512 (1.7 KB at D >= 768). Not yet timed
# on a GPU.
_TILES = {16: (64, 4, 32, 4), 32: (64, 4, 32, 4), 64: (64, 4, 32, 8), 128: (64, 4, 32, 8),
          256: (64, 8, 32, 8), 512: (64, 8, 16, 8), 1024: (16, 8, 16, 8)}  # fmt: skip


def _launch_config(io_dtype: torch.dtype, feature_dim: int, backward: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(feature_dim))
    fwd_rows, fwd_warps, bwd_rows, bwd_warps = _TILES[block_d]
    return dict(
        BLOCK_N=bwd_rows if backward else fwd_rows,
        BLOCK_D=block_d,
        BLOCK_J=min(block_d, FC2_BLOCK_J),
        num_warps=bwd_warps if backward else fwd_warps,
        **_dot_settings(io_dtype),
    )


class ProjectionLossFunction(torch.autograd.Function):
    """(hidden, sample_idx, target_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind) -> (loss, mean cosine, first-row cosine)."""

    @staticmethod
    def forward(ctx, hidden, sample_idx, target_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind: LossKind):
        num_rows, hidden_size = hidden.shape
        feature_dim = fc1_w.shape[0]
        counts = torch.bincount(sample_idx)  # [max sample + 1]
        # each sample that has rows weighs 1 / (#such samples), shared evenly by its rows: sum = 1
        num_samples_with_rows = (counts > 0).sum()
        row_weight = (1.0 / (counts.clamp(min=1).float() * num_samples_with_rows))[sample_idx]  # [N] fp32
        target_norm = target.float().norm(dim=-1)  # [M] fp32

        pre_act = torch.empty((num_rows, feature_dim), dtype=torch.float32, device=hidden.device)
        cos, proj_norm, sq_err = (torch.empty(num_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
        cfg = _launch_config(hidden.dtype, feature_dim, backward=False)
        _projection_loss_forward_kernel[(triton.cdiv(num_rows, cfg["BLOCK_N"]),)](
            hidden, target_idx, target, target_norm, fc1_w, fc1_b, fc2_w, fc2_b,
            pre_act, cos, proj_norm, sq_err,
            num_rows, hidden_size, feature_dim,
            EPS=NORM_EPS, IS_MSE=kind == "mse", BLOCK_H=FC1_BLOCK_H, **cfg,
        )  # fmt: skip
        mean_cos = (row_weight * cos).sum()
        loss = (row_weight * sq_err).sum() if kind == "mse" else 1.0 - mean_cos
        cos_first = first_row_mean(cos, sample_idx)

        ctx.save_for_backward(
            hidden, target_idx, target, target_norm, fc1_w, fc2_w, fc2_b, row_weight, pre_act, cos, proj_norm
        )
        ctx.kind = kind
        ctx.mark_non_differentiable(mean_cos, cos_first)
        return loss, mean_cos, cos_first

    @staticmethod
    def backward(ctx, grad_loss, _grad_mean_cos, _grad_cos_first):
        (hidden, target_idx, target, target_norm, fc1_w, fc2_w, fc2_b, row_weight, pre_act, cos, proj_norm) = (
            ctx.saved_tensors
        )
        num_rows, feature_dim = pre_act.shape
        is_mse = ctx.kind == "mse"
        # loss = 1 - sum_n w_n cos_n  or  sum_n w_n sq_err_n
        row_grad = row_weight * (grad_loss.float() if is_mse else -grad_loss.float())  # [N]

        act, grad_proj, grad_pre = (torch.empty_like(pre_act, dtype=hidden.dtype) for _ in range(3))
        cfg = _launch_config(hidden.dtype, feature_dim, backward=True)
        _projection_loss_backward_kernel[(triton.cdiv(num_rows, cfg["BLOCK_N"]),)](
            pre_act, target_idx, target, target_norm, fc2_w, fc2_b, cos, proj_norm, row_grad,
            act, grad_proj, grad_pre,
            num_rows, feature_dim,
            EPS=NORM_EPS, IS_MSE=is_mse, **cfg,
        )  # fmt: skip

        need = ctx.needs_input_grad
        grad_hidden = grad_pre @ fc1_w if need[0] else None  # [N, H]
        grad_fc1_w = grad_pre.t() @ hidden if need[4] else None  # [D, H]
        grad_fc1_b = grad_pre.sum(0, dtype=torch.float32).to(hidden.dtype) if need[5] else None
        grad_fc2_w = grad_proj.t() @ act if need[6] else None  # [D, D]
        grad_fc2_b = grad_proj.sum(0, dtype=torch.float32).to(hidden.dtype) if need[7] else None
        return grad_hidden, None, None, None, grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b, None


def _check_inputs(hidden, sample_idx, target_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind) -> None:
    if kind not in ("cosine", "mse"):
        raise ValueError(f"unknown alignment loss {kind!r}; use 'cosine' or 'mse'")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    num_rows, hidden_size = hidden.shape
    feature_dim = fc1_w.shape[0]
    expected = {
        "fc1_w": (fc1_w, (feature_dim, hidden_size)),
        "fc1_b": (fc1_b, (feature_dim,)),
        "fc2_w": (fc2_w, (feature_dim, feature_dim)),
        "fc2_b": (fc2_b, (feature_dim,)),
        "sample_idx": (sample_idx, (num_rows,)),
        "target_idx": (target_idx, (num_rows,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for hidden {tuple(hidden.shape)}, got {tuple(tensor.shape)}"
            )
    if target.dim() != 2 or target.shape[1] != feature_dim:
        raise ValueError(f"target must be [M, D={feature_dim}], got shape {tuple(target.shape)}")
    for name, index in (("sample_idx", sample_idx), ("target_idx", target_idx)):
        if index.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {index.dtype}")
    if num_rows and not 0 <= int(target_idx.min()) <= int(target_idx.max()) < target.shape[0]:
        raise ValueError(f"target_idx (or sample_idx) holds indices outside the M={target.shape[0]} target rows")
    if hidden.dtype not in _TRITON_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported; use float32, bfloat16 or float16")
    for name, tensor in (("fc1_w", fc1_w), ("fc1_b", fc1_b), ("fc2_w", fc2_w), ("fc2_b", fc2_b)):
        if tensor.dtype != hidden.dtype:
            raise ValueError(
                f"{name} is {tensor.dtype} but hidden is {hidden.dtype}; cast the projector to the backbone dtype"
            )
    if feature_dim > ALIGN_MAX_FEATURE_DIM:
        raise ValueError(
            f"projector width D={feature_dim} exceeds the fused kernel's limit {ALIGN_MAX_FEATURE_DIM}; "
            "use model.fused_kernels=off (or auto) for this encoder"
        )


def fused_projection_loss(
    hidden: torch.Tensor,
    sample_idx: torch.Tensor,
    target: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor,
    kind: LossKind = "cosine",
    target_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean cosine, first-row cosine), fp32 scalars; both cosines detached (see the module docstring).

    hidden [N, H]; sample_idx [N] int64 (the sample of each row, for the averaging); target [M, D];
    target_idx [N] int64 in [0, M) (default ``sample_idx``: one target per sample, M = B); fc1_w [D, H];
    fc1_b [D]; fc2_w [D, D]; fc2_b [D]. Samples without rows are left out of the means. Gradients flow
    to hidden and the four projector tensors, never to target. With N == 0 the loss is a zero that
    still depends on hidden and the projector, so every ZeRO-3 rank runs the same backward.
    """
    target_idx = sample_idx if target_idx is None else target_idx
    _check_inputs(hidden, sample_idx, target_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, kind)
    if hidden.shape[0] == 0:
        zero = (hidden.sum() + fc1_w.sum() + fc1_b.sum() + fc2_w.sum() + fc2_b.sum()).float() * 0.0
        return zero, zero.detach(), zero.detach()
    check_launchable(hidden, _projection_loss_forward_kernel, __name__)
    tensors = [t.contiguous() for t in (hidden, sample_idx, target_idx, target.detach(), fc1_w, fc1_b, fc2_w, fc2_b)]
    return ProjectionLossFunction.apply(*tensors, kind)


def fused_projection_cosine_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b) -> torch.Tensor:
    """1 - mean_b mean_{n in b} cos(W2 gelu(W1 h_n + b1) + b2, t_b): the loss of ``fused_projection_loss``."""
    return fused_projection_loss(hidden, sample_idx, target, fc1_w, fc1_b, fc2_w, fc2_b, "cosine")[0]
