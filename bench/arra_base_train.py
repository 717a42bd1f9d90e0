"""Training throughput of ARRA-Base (LlamaGen GPT-B/L + alignment) vs the next-token-only step, through the real engine.

    # CPU smoke run (GPT-B width, 2 blocks):
    python bench/arra_base_train.py --size B --layers 2 --micro-batch 2 --steps 4 --warmup 1
    # GPT-B / GPT-L on one GPU, ZeRO-2 (what fits a 111M / 343M model), bf16:
    deepspeed --num_gpus 1 bench/arra_base_train.py --size B --micro-batch 32 --ds_config ds_configs/zero2.json

A step is one micro-batch of --micro-batch images (256 codes each at 256 px, VQ-16 vocabulary 16384) with
random codes, classes and 512-d targets (CLIP ViT-B/16 width), forward + backward + optimizer. Both modes
run in the same process: "ar" (align.weight=0, LlamaGen as published) then "arra" (lambda 1, MLP projector,
<HYBNEXT> = all 256 positions, layer 1). Prints tokens/s (codes/s), the forward / backward / optimizer
split, peak memory and MFU on GPU, and the ARRA / AR step-time ratio (the cost of the alignment term).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import distributed as dist  # noqa: E402
from arra_ds.cli import run_launcher  # noqa: E402
from arra_ds.model.llamagen.config import LLAMAGEN_SIZES  # noqa: E402
from arra_ds.train.engine import Engine, fill_ds_config, init_distributed, load_ds_config  # noqa: E402
from arra_ds.train.flops import peak_flops  # noqa: E402
from arra_ds.train.run_config import RunConfig  # noqa: E402
from bench.harness import time_engine_steps  # noqa: E402

VOCAB = 16384  # VQ-16 codebook
CODES = 256  # 16 x 16 codes: 256 px
NUM_CLASSES = 1000
FEATURE_DIM = 512  # CLIP ViT-B/16 [CLS]


def random_batch(micro_batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB, (micro_batch, CODES), generator=g)
    return {
        "class_ids": torch.randint(0, NUM_CLASSES, (micro_batch,), generator=g),
        "input_ids": codes,
        "labels": codes.clone(),
        "attention_mask": torch.ones_like(codes),
        "target_features": torch.randn(micro_batch, FEATURE_DIM, generator=g),
    }


def measure(mode: str, args, ds_template: dict) -> dict:
    cfg = RunConfig()
    cfg.model.source = "llamagen"
    cfg.model.llamagen.size = args.size
    if args.layers:
        cfg.model.llamagen.n_layer = args.layers
    cfg.model.activation_checkpointing = args.activation_checkpointing
    cfg.align.weight = 1.0 if mode == "arra" else 0.0
    cfg.align.feature_dim = FEATURE_DIM
    cfg.train.micro_batch_size = args.micro_batch
    cfg.optim.lr = 1e-4
    cfg.model.validate()
    ds_config = fill_ds_config(ds_template, cfg.train, cfg.optim, dist.world_size(), cfg.model.shape().hidden_size)
    torch.manual_seed(0)
    engine = Engine(cfg.model, cfg.align, cfg.optim, ds_config)
    model = engine.model
    batch = random_batch(args.micro_batch, seed=dist.rank())
    engine.train()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    phases, out = time_engine_steps(engine, batch, args.warmup, args.steps)
    step_s = statistics.median([f + b + o for f, b, o in zip(*phases.values())])  # robust to a busy neighbour
    tokens_per_s = args.micro_batch * CODES / step_s
    peak = peak_flops()
    flops = model.flops_per_token(CODES)
    result = {
        "mode": mode,
        "tokens_per_s_per_rank": tokens_per_s,
        "images_per_s_per_rank": args.micro_batch / step_s,
        "step_ms": 1e3 * step_s,
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in phases.items()},
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "parameters": model.num_parameters(),
        "final_loss": float(out.loss.item()),
    }
    del engine, model, out
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(LLAMAGEN_SIZES), default="B")
    parser.add_argument("--layers", type=int, default=0, help="blocks (default: the size's)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    init_distributed()
    ds_template = load_ds_config(args.ds_config)
    results = [measure(mode, args, ds_template) for mode in ("ar", "arra")]
    ratio = results[1]["step_ms"] / results[0]["step_ms"]
    if dist.is_rank0():
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        layers = args.layers or LLAMAGEN_SIZES[args.size][0]
        print(f"\nLlamaGen GPT-{args.size} x {layers} blocks ({results[0]['parameters'] / 1e6:.1f}M parameters), "
              f"{CODES} codes/image, micro-batch {args.micro_batch}, {dist.world_size()} rank(s), {device}, {args.ds_config}")
        print(f"{'mode':6} {'codes/s/rank':>13} {'img/s/rank':>11} {'step ms':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} "
              f"{'peak GiB':>9} {'MFU':>6}")
        for r in results:
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(f"{r['mode']:6} {r['tokens_per_s_per_rank']:13.1f} {r['images_per_s_per_rank']:11.2f} {r['step_ms']:9.1f} "
                  f"{r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['optimizer_ms']:8.1f} {fmt(r['peak_mem_gib'], '9.2f'):>9} "
                  f"{fmt(r['mfu'], '6.1%'):>6}")
        print(f"ARRA / AR step time: {ratio:.3f} (alignment term costs {100 * (ratio - 1):.1f}% of the AR step)")
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "device": device, "results": results,
                                                  "arra_over_ar_step_time": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(main))  # tears the process group down before exit, as the launchers do
