"""LM head + cross-entropy + z-loss in torch: the chunked fallback of ``lm_loss.py``'s Triton kernel
and the naive full-logits reference.

Shapes: N = supervised positions gathered from a [B, T] batch, H = hidden size, V = vocabulary.

``chunked_lm_loss`` never builds the [N, V] fp32 logits: it walks N in chunks, and for each chunk
computes logits, logsumexp, the loss *and already the gradient* w.r.t. the chunk's hidden states
and the head weight (as Liger-Kernel's fused linear cross-entropy does). Backward then only scales
the stored gradients, so the peak extra memory is one [chunk, V] fp32 block plus a [V, H] fp32
gradient accumulator, and the matmul count equals the naive path (1 forward, 2 backward).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F



def accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight [V, H] fp32 += grad_logits^T [V, n] @ hidden [n, H], without a [V, H] temporary where possible."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), hidden)
    elif grad_weight.is_cuda:
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:  # CPU has no low-precision addmm into an fp32 output
        grad_weight += (grad_logits.t() @ hidden).float()


class PrecomputedGradLinearLoss(torch.autograd.Function):
    """Base of the LM-head losses whose forward already computes d loss / d (hidden, weight).

    Subclasses (the torch chunked loss here, the Triton one in lm_loss.py) end their forward
    with ``finish_forward`` and share this backward, which only scales the stored gradients.
    """

    @staticmethod
    def finish_forward(ctx, grad_hidden, grad_weight, weight_dtype, ce, z, z_loss_weight: float):
        loss = ce + z_loss_weight * z
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight_dtype
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        out_hidden = out_weight = None
        if ctx.needs_input_grad[0]:
            out_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1]:
            out_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return out_hidden, out_weight, None, None, None


class _ChunkedLinearCrossEntropy(PrecomputedGradLinearLoss):
    """loss = mean_n CE(h_n W^T, y_n) + z_w * mean_n logsumexp(h_n W^T)^2, gradients precomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight: float, chunk_size: int):
        # hidden [N, H], weight [V, H], targets [N] int64 (all valid: the caller drops ignored rows)
        num_rows = hidden.shape[0]
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None

        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            h = hidden[start:end]  # [n, H]
            y = targets[start:end]  # [n]
            logits = (h @ weight.t()).float()  # [n, V] fp32: the only full-width block alive
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            ce_sum += (lse - target_logit).sum()
            z_sum += lse.square().sum()
            if want_hidden_grad or want_weight_grad:
                # d/dlogits [ (lse - logit_y) + z_w * lse^2 ] / N = (softmax * (1 + 2 z_w lse) - onehot_y) / N
                probs = logits.sub_(lse[:, None]).exp_()
                probs.mul_(((1.0 + 2.0 * z_loss_weight * lse) / num_rows)[:, None])
                probs[torch.arange(end - start, device=probs.device), y] -= 1.0 / num_rows
                grad_logits = probs.to(hidden.dtype)  # [n, V]
                if want_hidden_grad:
                    grad_hidden[start:end] = grad_logits @ weight
                if want_weight_grad:
                    accumulate_weight_grad(grad_weight, grad_logits, h)
            del logits

        return PrecomputedGradLinearLoss.finish_forward(
            ctx, grad_hidden, grad_weight, weight.dtype, ce_sum / num_rows, z_sum / num_rows, z_loss_weight
        )


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_loss_weight: float = 0.0,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss over already-shifted, already-filtered rows.

    hidden [N, H] (final-norm outputs of the positions that have a target), weight [V, H] (lm_head),
    targets [N]. Returns (loss = ce + z_w * z, ce, z); ce and z are detached, for logging.
    With N == 0 the loss is a zero that still depends on both inputs, so backward runs the same
    collectives on every rank.
    """
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.float(), zero.detach().float(), zero.detach().float()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, float(z_loss_weight), int(chunk_size))


def reference_lm_loss(hidden, weight, targets, z_loss_weight: float = 0.0):
    """Naive full-logits fp32 reference (what Lumina-mGPT does), for tests and benchmarks."""
    logits = (hidden @ weight.t()).float()
    ce = F.cross_entropy(logits, targets)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return ce + z_loss_weight * z, ce.detach(), z.detach()
