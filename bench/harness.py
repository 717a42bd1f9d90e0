"""Shared timing / memory / table code of the kernel benchmarks (bench/align_kernel.py, bench/lm_loss.py).

Each implementation is a zero-argument callable that runs one forward + backward. Time: mean over
``iters`` calls after ``warmup`` calls (torch.compile compiles during warmup), with device syncs.
Peak memory (CUDA only): the highest allocation above what was allocated before the call, i.e.
activations, logits, temporaries and the gradients it produces; the inputs are not counted.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Measurement:
    name: str
    ms: float
    peak_bytes: int | None  # None on CPU
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, step: Callable[[], None], device: torch.device, warmup: int, iters: int, note: str = ""
) -> Measurement:
    for _ in range(warmup):
        step()
    _sync(device)
    gc.collect()
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return Measurement(name, (time.perf_counter() - start) * 1e3 / iters, peak, note)


def print_table(title: str, rows: list[Measurement]) -> None:
    """Markdown table; ratios are against the first row (the eager baseline)."""
    base = rows[0]
    print(f"\n{title}\n")
    print("| implementation | fwd+bwd ms | time / eager | peak extra MiB | memory / eager | note |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if row.peak_bytes is None:
            mem, mem_ratio = "-", "-"
        else:
            mem = f"{row.peak_bytes / 2**20:.1f}"
            mem_ratio = f"{row.peak_bytes / base.peak_bytes:.3f}" if base.peak_bytes else "-"
        print(f"| {row.name} | {row.ms:.3f} | {row.ms / base.ms:.3f} | {mem} | {mem_ratio} | {row.note} |")


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b| (normwise, as in tests/test_kernels.py)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30)).item()
