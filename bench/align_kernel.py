"""Alignment projector + loss (ARRA's L_GVA), forward + backward: eager torch vs torch.compile vs the
fused Triton kernel of kernels/align_loss.py.

    # 7B shape on one GPU: N = 8 x 1024 aligned rows, H = 4096, D = 512, bf16
    python bench/align_kernel.py
    # CPU smoke run (the fused kernel runs in Triton's interpreter: its time is not a kernel time)
    python bench/align_kernel.py --small --device cpu

All implementations get the same inputs (8 samples, rows sorted by sample as the model's
``aligned_positions`` gives them) and produce gradients for hidden and the four projector tensors.
Prints a markdown table (time and peak extra memory, ratios vs eager) and each implementation's
largest normwise error against eager on the loss and every gradient.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_cli import kernel_bench_parser, parse_with_shape, select_device  # noqa: E402

SEVEN_B = dict(rows_per_sample=1024, samples=8, hidden=4096, dim=512)  # 512x512 image: 32 x 32 codes
SMALL = dict(rows_per_sample=64, samples=4, hidden=256, dim=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = kernel_bench_parser(__doc__, SEVEN_B, SMALL, warmup=3, iters=10)
    p.add_argument("--rows-per-sample", type=int, help="aligned rows per sample (N = samples x this)")
    p.add_argument("--samples", type=int, help="samples B")
    p.add_argument("--hidden", type=int, help="backbone width H")
    p.add_argument("--dim", type=int, help="projector width D")
    p.add_argument("--kind", choices=["cosine", "mse"], default="cosine")
    p.add_argument("--impls", default="eager,compile,fused", help="comma list of eager, compile, fused")
    return parse_with_shape(p, argv, SEVEN_B, SMALL)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = select_device(args)  # before torch imports triton.language
    import torch
    import torch.nn.functional as F

    from arra_ds.kernels.align_loss import fused_projection_loss, reference_projection_loss
    from bench.harness import compare_implementations, print_table, write_json

    n = args.rows_per_sample * args.samples
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, args.hidden, generator=g).to(device, dtype).requires_grad_()
    sample_idx = torch.arange(args.samples).repeat_interleave(args.rows_per_sample).to(device)
    target = torch.randn(args.samples, args.dim, generator=g).to(device)
    params = [
        (torch.randn(args.dim, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype).requires_grad_(),
        (0.1 * torch.randn(args.dim, generator=g)).to(device, dtype).requires_grad_(),
        (torch.randn(args.dim, args.dim, generator=g) / args.dim**0.5).to(device, dtype).requires_grad_(),
        (0.1 * torch.randn(args.dim, generator=g)).to(device, dtype).requires_grad_(),
    ]
    leaves = [hidden, *params]

    def eager(*inputs):
        return reference_projection_loss(*inputs, kind=args.kind)[0]

    def dense_loss(hidden, row_weight, target_rows, fc1_w, fc1_b, fc2_w, fc2_b):
        # gva_loss without its data-dependent parts, so torch.compile gets one graph (fullgraph=True)
        projected = F.linear(F.gelu(F.linear(hidden, fc1_w, fc1_b)), fc2_w, fc2_b).float()
        if args.kind == "mse":
            return (row_weight * (projected - target_rows).square().mean(-1)).sum()
        cos = (F.normalize(projected, dim=-1) * F.normalize(target_rows, dim=-1)).sum(-1)
        return 1.0 - (row_weight * cos).sum()

    compiled_dense_loss = torch.compile(dense_loss, fullgraph=True, backend=args.compile_backend)

    def compiled(hidden, sample_idx, target, *params):
        counts = torch.bincount(sample_idx, minlength=target.shape[0])
        row_weight = (1.0 / (counts.clamp(min=1).float() * (counts > 0).sum()))[sample_idx]
        return compiled_dense_loss(hidden, row_weight, target.float()[sample_idx], *params)

    def fused(*inputs):
        return fused_projection_loss(*inputs, kind=args.kind)[0]

    impls = {
        "eager": (eager, "AlignHead mlp + gva_loss (model torch path)"),
        "compile": (
            compiled,
            f"torch.compile(fullgraph, backend={args.compile_backend}) of the same math, row weights outside",
        ),
        "fused": (fused, "kernels/align_loss.py"),
    }
    if device.type == "cpu":
        impls["fused"] = (fused, "Triton CPU interpreter: not a kernel time")

    def run_once(fn):
        for leaf in leaves:
            leaf.grad = None
        loss = fn(hidden, sample_idx, target, *params)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    names = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(names) - set(impls))
    if unknown or not names or names[0] != "eager":
        raise SystemExit(f"--impls must start with eager and use only {sorted(impls)}; got {args.impls!r}")
    device_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"align loss ({args.kind}) fwd+bwd: N={n} ({args.samples} x {args.rows_per_sample}), H={args.hidden}, "
        f"D={args.dim}, {args.dtype}, {device}{device_name}"
    )
    rows = compare_implementations(
        impls, names, run_once, ["loss", "d hidden", "d fc1_w", "d fc1_b", "d fc2_w", "d fc2_b"], device,
        args.warmup, args.iters,
    )
    print_table("time and peak extra memory (ratios vs eager); errors vs eager", rows)
    if args.out:
        config = dict(kind=args.kind, rows=n, samples=args.samples, hidden=args.hidden, dim=args.dim,
                      dtype=args.dtype, device=f"{device}{device_name}", warmup=args.warmup, iters=args.iters,
                      compile_backend=args.compile_backend)
        write_json(args.out, config, rows)


if __name__ == "__main__":
    main()
