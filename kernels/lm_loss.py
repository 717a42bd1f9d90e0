"""LM head + cross-entropy + z-loss without [N, V] fp32 logits: a Triton row kernel between two
cuBLAS matmuls, gradients computed during the forward pass.

    loss = mean_n CE(h_n W^T, y_n) + z_w * mean_n logsumexp(h_n W^T)^2      over the given rows

Same contract as ``lm_loss_torch.chunked_lm_loss`` (rows already shifted and filtered, so N
is known without a host sync; returns (loss, ce, z) with ce and the *unweighted* z detached for
logging). ``reference_lm_loss`` (full fp32 logits, what Lumina-mGPT does) is the pure-torch
reference, re-exported here.

Per chunk of rows: logits = h W^T in the parameter dtype ([chunk, V], the only full-width block
alive), then each Triton program takes BLOCK_ROWS rows (1 at V = 65536) and reads them twice: an
online max / sum-exp pass for the fp32 logsumexp, then a pass that overwrites the logits in place with
    dL/dlogits = (softmax * (1 + 2 z_w lse) - onehot(y)) / N
and cuBLAS turns that into dL/dh (chunk rows) and dL/dW (accumulated in fp32). Backward only
scales the stored gradients. Compared with the torch chunked version this drops the [chunk, V]
fp32 copy and its elementwise passes.

Why not Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (same algorithm, its
``lse_square_scale`` is z_w): its loss and gradients agree with ours (tests/kernels compares
them), but (1) the z term it returns is already multiplied by z_w, so the unweighted z we log is
lost when z_w = 0, and it is accumulated per row in the input dtype (bf16 on GPU runs); (2) it
counts the valid rows with ``.item()`` (a host sync per call); (3) without ``accum_dtype`` it
accumulates dL/dW in the parameter dtype.

CPU: set ``TRITON_INTERPRET=1`` before Triton is first imported (tests/conftest.py does); the kernel
only loads, widens to fp32 and stores, which the interpreter handles for bf16 as well, except that
it rounds the bf16 gradient store toward zero where the GPU rounds to nearest even (one bf16 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from arra_ds.kernels.modes import check_launchable
from arra_ds.kernels.lm_loss_torch import PrecomputedGradLinearLoss, accumulate_weight_grad, reference_lm_loss

__all__ = ["fused_lm_loss", "FusedLinearCrossEntropyFunction", "reference_lm_loss"]

INTERPRETED = bool(triton.knobs.runtime.interpret)
# Elements of one [BLOCK_ROWS, BLOCK_V] logits tile (untuned): a 65536-wide vocabulary gets one row
# per program in 16384-wide slices, a small (debug) vocabulary several rows per program.
TILE_ELEMENTS = 16384
NUM_WARPS = 16  # 32 tile elements per thread (110 registers, no spills on sm_90: bench/kernel_resources.py)


@triton.jit
def _row_lse_ce_grad_kernel(
    logits_ptr,  # [n, V] parameter dtype; overwritten with dL/dlogits when WRITE_GRAD
    row_stride,
    targets_ptr,  # [n] int64 in [0, V)
    lse_ptr,  # out [n] fp32
    ce_ptr,  # out [n] fp32
    num_rows,  # n
    V,
    inv_total_rows,  # 1 / N over *all* rows (the mean), not this chunk
    z_loss_weight,
    WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK_ROWS, 1]
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0)

    # pass 1: online logsumexp in fp32. Padded rows read zeros (finite, never stored); padded
    # vocabulary columns are -inf so they add nothing.
    running_max = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_ROWS,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        logits = tl.load(row_ptrs + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(logits_ptr + rows.to(tl.int64) * row_stride + target, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ce_ptr + rows, lse - target_logit, mask=row_ok)

    # pass 2: d/dlogits [ (lse - logit_y) + z_w lse^2 ] / N, written over the logits
    if WRITE_GRAD:
        softmax_scale = (1.0 + 2.0 * z_loss_weight * lse) * inv_total_rows  # [BLOCK_ROWS]
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tile_ok = row_ok[:, None] & (cols < V)[None, :]
            logits = tl.load(row_ptrs + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            grad = tl.exp(logits - lse[:, None]) * softmax_scale[:, None]
            grad = tl.where(cols[None, :] == target[:, None], grad - inv_total_rows, grad)
            tl.store(row_ptrs + cols[None, :], grad.to(logits_ptr.dtype.element_ty), mask=tile_ok)


class FusedLinearCrossEntropyFunction(PrecomputedGradLinearLoss):
    """(hidden [N, H], weight [V, H], targets [N], z_w, chunk_size) -> (loss, ce, z)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight: float, chunk_size: int):
        num_rows = hidden.shape[0]
        vocab = weight.shape[0]
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_hidden_grad or want_weight_grad
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        ce_rows = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        block_v = min(TILE_ELEMENTS, triton.next_power_of_2(vocab))
        block_rows = TILE_ELEMENTS // block_v

        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            h = hidden[start:end]  # [n, H]
            logits = h @ weight.t()  # [n, V] parameter dtype
            _row_lse_ce_grad_kernel[(triton.cdiv(end - start, block_rows),)](
                logits, logits.stride(0), targets[start:end], lse[start:end], ce_rows[start:end],
                end - start, vocab, 1.0 / num_rows, z_loss_weight,
                WRITE_GRAD=want_grad, BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=NUM_WARPS,
            )  # fmt: skip
            if want_hidden_grad:
                grad_hidden[start:end] = logits @ weight  # logits now hold dL/dlogits
            if want_weight_grad:
                accumulate_weight_grad(grad_weight, logits, h)
            del logits

        return PrecomputedGradLinearLoss.finish_forward(
            ctx, grad_hidden, grad_weight, weight.dtype, ce_rows.sum() / num_rows, lse.square().sum() / num_rows,
            z_loss_weight,
        )


def fused_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_weight: float = 0.0,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss over already-shifted, already-filtered rows (see the module docstring).

    hidden [N, H] (final-norm outputs of the positions that have a target), weight [V, H] (lm_head),
    targets [N] int64 in [0, V). Returns (loss, ce, z), all fp32; ce and z are detached. With
    N == 0 the loss is a zero that still depends on both inputs.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; they must match")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.float(), zero.detach().float(), zero.detach().float()
    check_launchable(hidden, _row_lse_ce_grad_kernel, __name__)
    return FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), float(z_loss_weight), int(chunk_size)
    )
