"""Shared timing / memory / table code of the kernel benchmarks (bench/align_kernel.py, bench/lm_loss.py).

Each implementation is a zero-argument callable that runs one forward + backward. Time: mean over
``iters`` calls after ``warmup`` calls (torch.compile compiles during warmup), with device syncs.
Peak memory (CUDA only): the highest allocation above what was allocated before the call, i.e.
activations, logits, temporaries and the gradients it produces; the inputs are not counted.
An implementation that raises (a torch.compile or Triton error, out of memory) is recorded with its
error and the others still run, so one failure does not cost the whole table.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass
class Measurement:
    name: str
    ms: float | None  # None when the implementation failed
    peak_bytes: int | None  # None on CPU or after a failure
    note: str = ""
    # normwise error against the baseline (first row), per output: "loss", then one per gradient
    rel_errors: dict[str, float] = field(default_factory=dict)
    error: str = ""  # why it failed (exception type and first line), empty when it ran


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a host clock measures it."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_sync = synchronize


def timed(fn: Callable, *args, device: torch.device | str | None = None) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn(*args)``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - start, result


def time_engine_steps(engine, batch: dict, warmup: int, steps: int) -> tuple[dict[str, list[float]], object]:
    """Training steps of an ``arra_ds.train.engine.Engine`` on one fixed batch: seconds of each phase (forward,
    backward, optimizer) of the ``steps`` timed steps after ``warmup`` untimed ones, and the last step's output."""
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    out = None
    for step in range(warmup + steps):
        synchronize()
        t0 = time.perf_counter()
        out = engine.forward(batch)
        synchronize()
        t1 = time.perf_counter()
        engine.backward(out.loss)
        synchronize()
        t2 = time.perf_counter()
        engine.step()
        synchronize()
        t3 = time.perf_counter()
        if step >= warmup:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
    return phases, out


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


def compare_implementations(
    impls: dict[str, tuple[Callable, str]],
    names: Sequence[str],
    run_once: Callable[[Callable], tuple[torch.Tensor, list[torch.Tensor]]],
    output_names: Sequence[str],
    device: torch.device,
    warmup: int,
    iters: int,
) -> list[Measurement]:
    """Check each implementation against the first (the baseline), then time it.

    ``run_once(fn)`` runs one forward + backward of ``fn`` and returns (loss, gradients);
    ``output_names`` names the loss and each gradient, in that order. The baseline must run.
    """
    ref_loss, ref_grads = run_once(impls[names[0]][0])
    rows = []
    for name in names:
        fn, note = impls[name]
        try:
            loss, grads = run_once(fn)
            errors = [max_rel_error(loss, ref_loss), *(max_rel_error(a, b) for a, b in zip(grads, ref_grads))]
            row = measure(name, functools.partial(run_once, fn), device, warmup, iters, note)
            row.rel_errors = dict(zip(output_names, errors))
        except Exception as e:  # noqa: BLE001 - recorded in the table; the other implementations still run
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            row = Measurement(name, None, None, note, error=f"{type(e).__name__}: {first_line}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def print_table(title: str, rows: list[Measurement]) -> None:
    """Markdown tables: time and memory with ratios against the first row (the eager baseline), then
    each implementation's error against it."""
    base = rows[0]
    print(f"\n{title}\n")
    print("| implementation | fwd+bwd ms | time / eager | peak extra MiB | memory / eager | note |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if row.ms is None:
            print(f"| {row.name} | failed | - | - | - | {row.error} |")
            continue
        if row.peak_bytes is None:
            mem, mem_ratio = "-", "-"
        else:
            mem = f"{row.peak_bytes / 2**20:.1f}"
            mem_ratio = f"{row.peak_bytes / base.peak_bytes:.3f}" if base.peak_bytes else "-"
        time_ratio = f"{row.ms / base.ms:.3f}" if base.ms else "-"
        print(f"| {row.name} | {row.ms:.3f} | {time_ratio} | {mem} | {mem_ratio} | {row.note} |")
    output_names = next((list(r.rel_errors) for r in rows if r.rel_errors), [])
    print(f"\n| implementation | {' | '.join(f'{n} rel. error' for n in output_names)} |")
    print("|---|" + "---:|" * len(output_names))
    for row in rows:
        if row.rel_errors:
            print(f"| {row.name} | " + " | ".join(f"{row.rel_errors[n]:.2e}" for n in output_names) + " |")


def write_json(path: str | Path, config: dict, rows: list[Measurement]) -> None:
    """The run's configuration and every row (times in ms, peak memory in bytes), for bench/gpu/suite.py."""
    Path(path).write_text(json.dumps({"config": config, "rows": [asdict(r) for r in rows]}, indent=1))


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b| (normwise, as in tests/test_kernels.py)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30)).item()
