"""Training throughput of the ARRA step vs the AR-only step, in one run, through the real trainer engine.

    # CPU smoke run (debug shape):
    deepspeed bench/train_throughput.py --shape debug --steps 8
    # Chameleon-7B layer shape on one GPU, as many layers as fit, ZeRO-3, bf16, activation checkpointing:
    deepspeed --num_gpus 1 bench/train_throughput.py --shape chameleon7b --layers 8 --seq-len 4096 --micro-batch 1
    # one mode per process (a DeepSpeed engine is not freed within a process, so two 7B engines would not
    # fit on one GPU; bench/gpu/suite.py runs --modes arra and --modes ar and takes the ratio of the JSONs):
    python bench/train_throughput.py --shape chameleon7b --seq-len 4096 --micro-batch 1 --modes arra --out arra.json

Batches use the real token layout: (prompt + 1060-token 512x512 image part) units packed back to back
to fill --seq-len, labels -100 over each prompt, one target feature per row. Prints tokens/s, MFU and
HFU (PaLM formula, GPU only), peak memory beside launch/plan.py's planned peak for the same setting, the
forward/backward/optimizer split, and the ARRA/AR step-time ratio (the cost of the alignment term) when
both modes ran. --out writes the same as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arra_ds import distributed as dist  # noqa: E402
from arra_ds.cli import run_launcher  # noqa: E402
from arra_ds.train.engine import Engine, fill_ds_config, init_distributed, load_ds_config  # noqa: E402
from arra_ds.train.flops import peak_flops  # noqa: E402
from arra_ds.train.plan import GIB, PlanConfig, build_plan  # noqa: E402
from arra_ds.train.run_config import RunConfig  # noqa: E402
from bench.harness import time_engine_steps  # noqa: E402
from tests.gen_helpers import packed_batch  # noqa: E402

SHAPES = {
    # hidden, layers, heads, MLP, VQ codes, vocab (Chameleon-7B: 4096 / 32 / 32 / 11008 / 8192 / 65536)
    "debug": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  num_image_codes=256, vocab_size=0),
    "chameleon7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                        num_image_codes=8192, vocab_size=65536),
}


def planned_memory(cfg: RunConfig, precision: str, args) -> dict:
    """launch/plan.py's plan for the setting just measured, beside the measured peak: its allocated parts
    (the CUDA context is not in torch.cuda.max_memory_allocated) and each part."""
    cfg.train.precision = precision
    try:
        plan = build_plan(cfg, PlanConfig(gpus=dist.world_size(), seq_len=args.seq_len), args.ds_config)
    except Exception as e:  # noqa: BLE001 - a planner bug must not cost the measurement
        return {"planned_peak_gib": None, "plan_error": f"{type(e).__name__}: {e}"}
    return {"planned_peak_gib": plan.allocated_bytes / GIB,
            "planned_parts_gib": {p.key: p.bytes / GIB for p in plan.parts if p.key != "cuda_overhead"}}


def measure(mode: str, args, ds_template: dict) -> dict:
    cfg = RunConfig()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    for key, value in shape.items():
        setattr(cfg.model.debug, key, value)
    cfg.model.debug.max_position_embeddings = max(args.seq_len, 4096)
    cfg.model.activation_checkpointing = not args.no_activation_checkpointing
    cfg.model.z_loss_weight = 1e-5
    cfg.align.weight = 1.0 if mode == "arra" else 0.0
    cfg.align.feature_dim = args.feature_dim
    cfg.train.micro_batch_size = args.micro_batch
    cfg.data.max_seq_len = args.seq_len
    cfg.optim.lr = 1e-5
    ds_config = fill_ds_config(ds_template, cfg.train, cfg.optim, dist.world_size(), shape["hidden_size"])
    engine = Engine(cfg.model, cfg.align, cfg.optim, ds_config)
    model = engine.model
    vocab = model.vocab
    batch = packed_batch(vocab, args.micro_batch, args.seq_len, args.code_side, args.prompt_len, args.feature_dim, seed=dist.rank())
    engine.train()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    phases, out = time_engine_steps(engine, batch, args.warmup, args.steps)
    # medians: robust to the odd slow step (allocator growth, a busy neighbour on a shared host)
    timings = {k: statistics.median(v) for k, v in phases.items()}
    step_s = statistics.median([f + b + o for f, b, o in zip(*phases.values())])
    tokens_per_s = args.micro_batch * args.seq_len / step_s  # per rank
    flops = model.flops_per_token(args.seq_len)
    non_embedding = model.non_embedding_parameters()
    # Full activation checkpointing re-runs every layer's forward: hardware does 8N + 16LHT per token.
    recompute = 0.0 if args.no_activation_checkpointing else (2 * non_embedding + 4 * shape["num_hidden_layers"] * shape["hidden_size"] * args.seq_len)
    peak = peak_flops()
    result = {
        "mode": mode,
        "tokens_per_s_per_rank": tokens_per_s,
        "step_ms": 1e3 * step_s,
        **{f"{k}_ms": 1e3 * v for k, v in timings.items()},
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "hfu": (flops + recompute) * tokens_per_s / peak if peak else None,
        "non_embedding_params": non_embedding,
        "layers": shape["num_hidden_layers"],
        "flops_per_token": flops,
        "peak_flops": peak,
        "final_loss": float(out.loss.item()),
        **planned_memory(cfg, engine.precision, args),
    }
    del engine, model, out
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="debug")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--code-side", type=int, default=32, help="VQ codes per image side (32 = 512x512)")
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--feature-dim", type=int, default=512, help="D of the target feature (BiomedCLIP: 512)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--modes", default="ar,arra", help="comma list of ar (align.weight=0) and arra, run in order")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    init_distributed()
    ds_template = load_ds_config(args.ds_config)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"ar", "arra"}:
        parser.error(f"--modes takes ar and/or arra, got {args.modes!r}")
    results = [measure(mode, args, ds_template) for mode in modes]
    by_mode = {r["mode"]: r for r in results}
    ratio = by_mode["arra"]["step_ms"] / by_mode["ar"]["step_ms"] if {"ar", "arra"} <= set(by_mode) else None
    if dist.is_rank0():
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"\n{args.shape} x {args.layers or SHAPES[args.shape]['num_hidden_layers']} layers, seq {args.seq_len}, "
              f"micro-batch {args.micro_batch}, {dist.world_size()} rank(s), {device}, {args.ds_config}")
        header = (f"{'mode':6} {'tok/s/rank':>11} {'step ms':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'peak GiB':>9} "
                  f"{'planned':>8} {'MFU':>6} {'HFU':>6}")
        print(header)
        for r in results:
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(f"{r['mode']:6} {r['tokens_per_s_per_rank']:11.1f} {r['step_ms']:9.1f} {r['forward_ms']:8.1f} "
                  f"{r['backward_ms']:8.1f} {r['optimizer_ms']:8.1f} {fmt(r['peak_mem_gib'], '9.2f'):>9} "
                  f"{fmt(r['planned_peak_gib'], '8.2f'):>8} "
                  f"{fmt(r['mfu'], '6.1%'):>6} {fmt(r['hfu'], '6.1%'):>6}")
        if ratio is not None:
            print(f"ARRA / AR step time: {ratio:.3f} (alignment term costs {100 * (ratio - 1):.1f}% of the AR step)")
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "device": device, "results": results,
                                                  "arra_over_ar_step_time": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(main))  # tears the process group down before exit, as the launchers do
