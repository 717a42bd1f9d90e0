"""LM head + cross-entropy + z-loss, forward + backward: the Lumina-style fp32-logits path (eager) vs
torch.compile of it, our torch chunked version, our Triton kernel (kernels/lm_loss.py) and
Liger-Kernel's fused linear cross-entropy.

    # 7B shape on one GPU: B x T = 8 x 4096 rows, H = 4096, V = 65536, bf16, z_w = 1e-5
    python bench/lm_loss.py
    # CPU smoke run (Triton kernels run in the interpreter: their times are not kernel times)
    python bench/lm_loss.py --small --device cpu

Every implementation produces the loss (CE + z_w * mean lse^2 over all rows) and the gradients of
the hidden states and the head weight. Prints a markdown table (time and peak extra memory, ratios
vs eager) and each implementation's normwise error against eager.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_cli import kernel_bench_parser, parse_with_shape, select_device  # noqa: E402

SEVEN_B = dict(rows=8 * 4096, hidden=4096, vocab=65536)
SMALL = dict(rows=512, hidden=64, vocab=1024)
IMPLS = ("eager", "compile", "chunked", "fused", "liger")


def parse_args(argv=None) -> argparse.Namespace:
    p = kernel_bench_parser(__doc__, SEVEN_B, SMALL, warmup=2, iters=5)
    p.add_argument("--rows", type=int, help="supervised rows N = B x T")
    p.add_argument("--hidden", type=int, help="H")
    p.add_argument("--vocab", type=int, help="V")
    p.add_argument("--z-loss-weight", type=float, default=1e-5)
    p.add_argument("--chunk-size", type=int, default=2048, help="rows per chunk (chunked and fused)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list, eager first, of {', '.join(IMPLS)}")
    return parse_with_shape(p, argv, SEVEN_B, SMALL)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = select_device(args)  # before torch imports triton.language
    import torch

    from arra_ds.kernels.lm_loss import fused_lm_loss
    from arra_ds.kernels.lm_loss_torch import chunked_lm_loss, reference_lm_loss
    from arra_ds.tokens.layout import IGNORE_INDEX
    from bench.harness import compare_implementations, print_table, write_json

    z_w = args.z_loss_weight
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)

    def eager(h, w, y):
        return reference_lm_loss(h, w, y, z_w)[0]

    def chunked(h, w, y):
        return chunked_lm_loss(h, w, y, z_w, args.chunk_size)[0]

    def fused(h, w, y):
        return fused_lm_loss(h, w, y, z_w, args.chunk_size)[0]

    def liger(h, w, y):
        # imported here: a broken Liger install then fails only its own row (bench/harness.py)
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # positional: bias, ce_weight, ignore_index, lse_square_scale (z_w), label_smoothing, reduction,
        # softcap, return_z_loss, accum_dtype (fp32 dW accumulation, as ours)
        return LigerFusedLinearCrossEntropyFunction.apply(
            h, w, y, None, None, IGNORE_INDEX, z_w, 0.0, "mean", None, False, torch.float32
        )[0]

    interp = " (Triton CPU interpreter: not a kernel time)" if device.type == "cpu" else ""
    impls = {
        "eager": (eager, "Lumina-style: full logits upcast to fp32"),
        "compile": (
            torch.compile(eager, backend=args.compile_backend), f"torch.compile(eager, backend={args.compile_backend})"
        ),
        "chunked": (chunked, f"arra_ds torch chunked, {args.chunk_size} rows/chunk"),
        "fused": (fused, f"kernels/lm_loss.py, {args.chunk_size} rows/chunk" + interp),
        "liger": (liger, "Liger-Kernel 0.8.5 fused linear CE" + interp),
    }
    names = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(names) - set(impls))
    if unknown or not names or names[0] != "eager":
        raise SystemExit(f"--impls must start with eager and use only {list(IMPLS)}; got {args.impls!r}")

    def run_once(fn):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss.detach(), [hidden.grad, weight.grad]

    device_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"LM head + CE + z-loss fwd+bwd: N={args.rows}, H={args.hidden}, V={args.vocab}, z_w={z_w}, {args.dtype}, "
          f"{device}{device_name}")
    rows = compare_implementations(
        impls, names, run_once, ["loss", "d hidden", "d weight"], device, args.warmup, args.iters
    )
    print_table("time and peak extra memory (ratios vs eager); errors vs eager", rows)
    if args.out:
        config = dict(rows=args.rows, hidden=args.hidden, vocab=args.vocab, z_loss_weight=z_w,
                      chunk_size=args.chunk_size, dtype=args.dtype, device=f"{device}{device_name}",
                      warmup=args.warmup, iters=args.iters, compile_backend=args.compile_backend)
        write_json(args.out, config, rows)


if __name__ == "__main__":
    main()
