"""Images/s of batched class-conditional sampling (ARRA-Base / LlamaGen) vs one image at a time, in one run.

    python bench/c2i_sampling.py --size cpu-small --num-images 8 --batch-size 8 --threads 1
    python bench/c2i_sampling.py --size B --num-images 256 --batch-size 64 --device cuda --dtype bf16

Both sides are ``arra_ds.generate.sampler.Sampler`` on the same randomly initialised GPT (head not zero, so
the draws are not uniform), with CFG 2.0 (conditional and null-class rows in one forward pass), KV cache,
no top-k / top-p, temperature 1 and per-sample seeds:

- one at a time: ``generate([class], [seed])`` per image (2 rows per forward with guidance);
- batched: ``--batch-size`` images per call.

256 codes per image (256 px, VQ-16). Decoding is not timed. Also reported: how many images both produce
identically (same seed; differences come only from float round-off of batch-B vs batch-1 matmuls flipping a draw).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.generate.sampler import Sampler  # noqa: E402
from arra_ds.generate.sampling import SamplingConfig, seed_for_sample  # noqa: E402
from arra_ds.model.llamagen.backbone import LLAMAGEN  # noqa: E402
from arra_ds.model.llamagen.config import LLAMAGEN_SIZES  # noqa: E402
from arra_ds.model.llamagen.gpt import LlamaGenGPT  # noqa: E402
from bench.harness import timed  # noqa: E402
from tests.llamagen_helpers import tiny_gpt  # noqa: E402

# cpu-small: GPT-B's vocabulary and sequence with a narrow, shallow body (CPU smoke runs).
SIZES = {**{name: {"size": name} for name in LLAMAGEN_SIZES}, "cpu-small": {"size": "B", "n_layer": 4, "n_head": 4, "dim": 256}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_STD = 0.02  # upstream starts the head at zero; a trained head is not, and uniform draws would flatter nothing


def build_model(size: str, device: str, dtype: torch.dtype) -> LlamaGenGPT:
    # upstream's sizes with the full vocabulary and 16 x 16 codes (the tests' builder at bench size)
    full = dict(n_layer=None, n_head=None, dim=None, vocab_size=16384, block_size=256, num_classes=1000, multiple_of=256)
    model = tiny_gpt(seed=0, head_std=HEAD_STD, **{**full, **SIZES[size]})
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.size, args.device, DTYPES[args.dtype])
    grid = (model.config.grid_size, model.config.grid_size)
    sampler = Sampler(LLAMAGEN, model, None, SamplingConfig(guidance_scale=args.cfg_scale), grid)
    classes = [k % model.config.num_classes for k in range(args.num_images)]
    seeds = [seed_for_sample(0, k) for k in range(args.num_images)]
    sampler.generate(classes[:1], seeds[:1])  # warm-up (allocator, kernels)

    def batched():
        return torch.cat([sampler.generate(classes[i : i + args.batch_size], seeds[i : i + args.batch_size]).codes
                          for i in range(0, args.num_images, args.batch_size)])

    def one_at_a_time():
        return torch.cat([sampler.generate([c], [s]).codes for c, s in zip(classes, seeds)])

    single_s, single = timed(one_at_a_time)
    batched_s, many = timed(batched)
    identical = sum(bool(torch.equal(a, b)) for a, b in zip(single, many))
    result = {
        "size": args.size, "parameters": sum(p.numel() for p in model.parameters()), "codes_per_image": model.config.block_size,
        "num_images": args.num_images, "batch_size": args.batch_size, "cfg_scale": args.cfg_scale, "device": args.device,
        "dtype": args.dtype, "batched_images_per_s": args.num_images / batched_s,
        "one_at_a_time_images_per_s": args.num_images / single_s, "speed_up": single_s / batched_s,
        "identical_images": identical,
    }
    print(f"GPT {args.size} ({result['parameters'] / 1e6:.1f}M), {result['codes_per_image']} codes/image, CFG {args.cfg_scale}, "
          f"{args.device} {args.dtype}: batched ({args.batch_size}) {result['batched_images_per_s']:.3f} img/s, one at a time "
          f"{result['one_at_a_time_images_per_s']:.3f} img/s, speed-up {result['speed_up']:.2f}x, "
          f"identical {identical}/{args.num_images}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
