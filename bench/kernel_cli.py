"""Command line shared by the kernel benchmarks (bench/align_kernel.py, bench/lm_loss.py).

Imports no torch at module level: without CUDA the kernels run in Triton's interpreter, and Triton
picks interpret vs compile when torch first imports triton.language, so ``TRITON_INTERPRET`` must be
set before that (``select_device``).
"""

from __future__ import annotations

import argparse
import os


def kernel_bench_parser(doc: str, seven_b: dict, small: dict, warmup: int, iters: int) -> argparse.ArgumentParser:
    """Parser with the options every kernel benchmark has; the script adds its shape options (default None)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help=f"CPU-sized shape {small} instead of the 7B shape {seven_b}")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the 'compile' row; 'eager' traces with dynamo only (a quick CPU check)",
    )
    p.add_argument("--out", default="", help="also write the configuration and every row as JSON here")
    return p


def parse_with_shape(p: argparse.ArgumentParser, argv, seven_b: dict, small: dict) -> argparse.Namespace:
    """Parse; shape options left unset take the --small or 7B shape."""
    args = p.parse_args(argv)
    for key, value in (small if args.small else seven_b).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def select_device(args: argparse.Namespace):
    """-> (torch.device, torch dtype) for --device / --dtype; sets TRITON_INTERPRET first on CPU."""
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and --small)")
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
