"""Versions and device facts for bench/gpu/suite.py's summary.json (one JSON object, to --out and stdout).

On a GPU it also measures the two ceilings that MFU and kernel times are read against (bench/gpu/README.md):
a bf16 8192 x 8192 x 8192 matrix product on random data and a device-to-device copy (bytes read + written),
each the median of 10 timed runs after 3 warm-ups, with CUDA events. About two seconds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata as md
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

# Distributions whose versions the summary records (those the parts import).
DISTRIBUTIONS = (
    "torch", "triton", "transformers", "tokenizers", "huggingface_hub", "deepspeed", "mosaicml-streaming",
    "open_clip_torch", "liger-kernel", "pytorch-msssim", "torchvision", "timm", "accelerate", "numpy", "pytest",
    "pytest-xdist",
)  # fmt: skip


def versions() -> dict[str, str | None]:
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def timed_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=False)
    return query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None


def ceilings() -> dict[str, float]:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = timed_ms(functools.partial(torch.matmul, a, b))
    src = torch.randn(2**30, device="cuda")  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = timed_ms(functools.partial(dst.copy_, src))
    moved = 2 * src.numel() * src.element_size()
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {
        "bf16_matmul_8192_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_tb_per_s": moved / (copy_ms * 1e-3) / 1e12,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions()}
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["device_count"] = torch.cuda.device_count()
        info["capability"] = f"{props.major}.{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
        info["memory_gib"] = props.total_memory / 2**30
        info["driver"] = driver_version()
        info["sdpa_flash_available"] = bool(torch.backends.cuda.is_flash_attention_available())
        try:
            info.update(ceilings())
        except Exception as e:  # noqa: BLE001 - the device facts above still reach the summary
            info["ceilings_error"] = f"{type(e).__name__}: {e}"
    else:
        info["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    text = json.dumps(info, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
