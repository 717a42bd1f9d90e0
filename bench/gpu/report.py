"""Turns bench/gpu/suite.py's summary.json into the GPU section of bench/RESULTS.md.

    python bench/gpu/report.py summary.json            # markdown, to paste into bench/RESULTS.md
    python bench/gpu/report.py summary.json --short    # the few headline lines the suite prints last

Every figure comes from the summary (device, date, versions, commands included); the goals of issue 16
are checked against it and said next to the numbers. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Goals the figures are read against (issue 16).
GOAL_MFU = 0.45
GOAL_ARRA_COST = 0.02
GOAL_LM_MEMORY_FACTOR = 10.0
# bench/pretokenize.py --size: what each size builds
PRETOKENIZE_SIZES = {
    "real": "Chameleon's VQGAN at 512 px and an open_clip ViT-B/16, random weights",
    "small": "a 128-px VQGAN with res blocks and the tiny test encoders",
    "tiny": "the test-size VQGAN at 64 px and the tiny test encoders",
}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else missing


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _env(summary: dict) -> dict:
    return summary.get("results", {}).get("env", {})


def header(summary: dict) -> list[str]:
    env = _env(summary)
    versions = env.get("versions", {})
    date = (summary.get("started") or "")[:10]
    lines = [f"## GPU run: {env.get('device', 'unknown device')}, {date} (`bench/gpu/run.sh`)", ""]
    if summary.get("mode") == "cpu-smoke":
        lines += ["CPU smoke run (`--cpu-smoke`: tiny sizes, Triton interpreter, install step dry-run): it checks that "
                  "every step runs; its times are not performance figures.", ""]  # fmt: skip
    if env.get("cuda_available"):
        lines.append(
            f"- Device: {env['device']}, {env.get('multiprocessors')} SMs, {_fmt(env.get('memory_gib'), '.1f')} GiB, "
            f"compute capability {env.get('capability')}, driver {env.get('driver')}; measured in the same run: bf16 "
            f"matmul 8192^3 {_fmt(env.get('bf16_matmul_8192_tflops'), '.0f')} TFLOP/s (random data), device copy "
            f"{_fmt(env.get('copy_tb_per_s'), '.2f')} TB/s (read + write); SDPA flash backend available: "
            f"{env.get('sdpa_flash_available')}."
        )
    else:
        lines.append(f"- Device: {env.get('device', 'unknown')}.")
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines.append(f"- Software: Python {env.get('python')}, CUDA {env.get('torch_cuda')}; {shown}.")
    call = summary.get("device_call", {})
    lines.append(
        f"- Command: `{summary.get('command')}`"
        + (f" (device tool: carry={json.dumps(call.get('carry'))}, timeout_s={call.get('timeout_s')})"
           if summary.get("mode") == "gpu" else "")
        + f"; commit {summary.get('commit') or 'not recorded'}; wall {_fmt(summary.get('wall_s'), '.0f')} s of a "
        f"{summary.get('budget_s')} s budget; started {summary.get('started')}."
    )  # fmt: skip
    lines += ["", "| part | step | status | seconds | timeout s | note |", "|---|---|---|---:|---:|---|"]
    for part in summary.get("parts", []):
        for s in part["steps"]:
            lines.append(f"| {part['key']} | {s['name']} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | "
                         f"{_fmt(s.get('timeout_s'), '.0f')} | {s.get('note', '')} |")  # fmt: skip
    lines += ["", "Commands (from the repository root):", ""]
    for part in summary.get("parts", []):
        for s in part["steps"]:
            if s.get("command"):
                lines.append(f"    {s['command']}")
    return lines


def tests_section(summary: dict) -> list[str]:
    tests = summary.get("results", {}).get("tests")
    if tests is None:
        return []
    counts = tests.get("counts", {})
    total = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test cases reported"
    lines = ["", "### 1. `gpu`-marked tests", "", f"`pytest -m gpu`: {total}." + (
        f" {tests['error']}." if tests.get("error") else "")]  # fmt: skip
    modules: dict[str, dict[str, int]] = {}
    for case in tests.get("cases", []):
        row = modules.setdefault(case["module"] or case["test"].split("::")[0], {})
        row[case["outcome"]] = row.get(case["outcome"], 0) + 1
    if modules:
        lines += ["", "| module | passed | failed | error | skipped |", "|---|---:|---:|---:|---:|"]
        for module, row in sorted(modules.items()):
            lines.append(f"| {module} | {row.get('passed', 0)} | {row.get('failed', 0)} | {row.get('error', 0)} | "
                         f"{row.get('skipped', 0)} |")  # fmt: skip
    bad = [c for c in tests.get("cases", []) if c["outcome"] in ("failed", "error")]
    if bad:
        lines += ["", "| failing test | outcome | s | message |", "|---|---|---:|---|"]
        lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['message']} |" for c in bad]
    skipped = sorted({c["message"] for c in tests.get("cases", []) if c["outcome"] == "skipped"})
    if skipped:
        lines += ["", "Skip reasons: " + "; ".join(m or "(none given)" for m in skipped) + "."]
    return lines


def kernel_table(bench: dict) -> list[str]:
    rows = bench.get("rows", [])
    base = rows[0] if rows else {}
    lines = ["| implementation | fwd+bwd ms | time / eager | peak extra MiB | memory / eager | max rel. error | note |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['name']} | failed | - | - | - | - | {r.get('error', '')} |")
            continue
        time_ratio = r["ms"] / base["ms"] if base.get("ms") else None
        mem = r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else None
        mem_ratio = r["peak_bytes"] / base["peak_bytes"] if mem is not None and base.get("peak_bytes") else None
        err = max(r.get("rel_errors", {}).values(), default=None)
        lines.append(f"| {r['name']} | {r['ms']:.3f} | {_fmt(time_ratio, '.3f')} | {_fmt(mem, '.1f')} | "
                     f"{_fmt(mem_ratio, '.3f')} | {_fmt(err, '.1e')} | {r.get('note', '')} |")  # fmt: skip
    return lines


def _row(bench: dict, name: str) -> dict | None:
    return next((r for r in bench.get("rows", []) if r["name"] == name and r.get("ms") is not None), None)


def kernels_section(summary: dict) -> list[str]:
    results = summary.get("results", {})
    align, lm = results.get("align_kernel"), results.get("lm_loss")
    if not align and not lm:
        return []
    lines = ["", "### 2. Fused kernels at the 7B shapes"]
    if align:
        c = align["config"]
        lines += ["", f"`bench/align_kernel.py`: alignment projector + {c['kind']} loss, fwd+bwd, N = {c['rows']} "
                  f"({c['samples']} samples), H = {c['hidden']}, D = {c['dim']}, {c['dtype']}, {c['device']}, mean of "
                  f"{c['iters']} after {c['warmup']} warm-ups; errors: largest over the loss and every gradient.",
                  ""] + kernel_table(align)  # fmt: skip
        fused, eager, compiled = (_row(align, n) for n in ("fused", "eager", "compile"))
        if fused and eager and fused.get("peak_bytes") is not None:
            rivals = [r for r in (eager, compiled) if r]
            ok = all(fused["ms"] < r["ms"] and fused["peak_bytes"] < r["peak_bytes"] for r in rivals)
            lines += ["", f"Goal (fused faster than eager and torch.compile, with less memory): {_met(ok)}."]
    if lm:
        c = lm["config"]
        lines += ["", f"`bench/lm_loss.py`: LM head + CE + z-loss (z_w = {c['z_loss_weight']}), fwd+bwd, N = {c['rows']}, "
                  f"H = {c['hidden']}, V = {c['vocab']}, {c['dtype']}, {c['device']}, {c['chunk_size']} rows per chunk, "
                  f"mean of {c['iters']} after {c['warmup']} warm-ups.", ""] + kernel_table(lm)  # fmt: skip
        fused, eager = _row(lm, "fused"), _row(lm, "eager")
        if fused and eager and fused.get("peak_bytes"):
            factor = eager["peak_bytes"] / fused["peak_bytes"]
            ok = factor >= GOAL_LM_MEMORY_FACTOR and fused["ms"] <= eager["ms"]
            lines += ["", f"Goal (fused >= {GOAL_LM_MEMORY_FACTOR:.0f}x less peak memory than the fp32-logits path at no "
                      f"more time): {factor:.1f}x less memory, {fused['ms'] / eager['ms']:.2f}x its time: {_met(ok)}."]
    return lines


def train_section(summary: dict) -> list[str]:
    train = summary.get("results", {}).get("train")
    if not train:
        return []
    env = _env(summary)
    measured = env.get("bf16_matmul_8192_tflops")
    runs = [(m, train[m]) for m in ("arra", "ar") if isinstance(train.get(m), dict) and train[m].get("results")]
    if not runs:
        return ["", "### 3. Training step", "", "No mode finished (see train.log)."]
    args = runs[0][1]["args"]
    shape = ("Chameleon-7B layer shape (hidden 4096, 32 heads, MLP 11008, vocab 65536)" if args["shape"] == "chameleon7b"
             else f"`{args['shape']}` shape")
    lines = ["", "### 3. Training step (`bench/train_throughput.py`)", "",
             f"{shape}, {args['layers']} decoder layers, seq {args['seq_len']}, micro-batch {args['micro_batch']}, bf16, "
             f"ZeRO-3 ({args['ds_config']}: DeepSpeed's ZeRO-3 with torch's AdamW, no FusedAdam build), activation "
             f"checkpointing {'off' if args.get('no_activation_checkpointing') else 'on'}, one {runs[0][1]['device']}, "
             f"median of {args['steps']} steps after {args['warmup']} warm-up steps; each mode in its own process. "
             "MFU/HFU against the datasheet's dense bf16 peak; the last column against the matmul rate measured in "
             "this run.", "",
             "| mode | layers | tokens/s | step ms | fwd ms | bwd ms | opt ms | step ms / layer | peak GiB | planned GiB "
             "| MFU | HFU | MFU vs measured matmul |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mode, run in runs:
        r = run["results"][0]
        vs_measured = r["mfu"] * r["peak_flops"] / (measured * 1e12) if r.get("mfu") and measured else None
        lines.append(
            f"| {mode} | {r['layers']} | {r['tokens_per_s_per_rank']:.0f} | {r['step_ms']:.1f} | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms'] / r['layers']:.2f} | "
            f"{_fmt(r.get('peak_mem_gib'), '.1f')} | {_fmt(r.get('planned_peak_gib'), '.1f')} | "
            f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('hfu'), '.1%')} | "
            f"{_fmt(vs_measured, '.1%')} |"
        )
    lines.append("")
    arra = dict(runs).get("arra", {}).get("results", [{}])[0]
    if arra.get("peak_mem_gib") and arra.get("planned_peak_gib"):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in arra.get("planned_parts_gib", {}).items())
        lines += [f"Memory plan vs measured (ARRA on): `launch/plan.py`'s plan for this setting {arra['planned_peak_gib']:.1f} "
                  f"GiB allocated ({parts}) vs measured peak {arra['peak_mem_gib']:.1f} GiB "
                  f"(planned / measured {arra['planned_peak_gib'] / arra['peak_mem_gib']:.2f}).", ""]  # fmt: skip
    if arra.get("mfu") is not None:
        lines += [f"Goal MFU >= {GOAL_MFU:.0%} (ARRA on): {arra['mfu']:.1%}: {_met(arra['mfu'] >= GOAL_MFU)}."]
    ratio = train.get("arra_over_ar_step_time")
    if ratio is not None:
        lines += [f"ARRA / AR step time {ratio:.4f}: the alignment term costs {100 * (ratio - 1):.2f}% of the step "
                  f"(goal < {GOAL_ARRA_COST:.0%}): {_met(ratio - 1 < GOAL_ARRA_COST)}."]  # fmt: skip
    if train.get("note"):
        lines += ["", f"Note: {train['note']}."]
    return lines


def generate_section(summary: dict) -> list[str]:
    results = summary.get("results", {})
    gen, pre = results.get("generate"), results.get("pretokenize")
    if not gen and not pre:
        return []
    lines = ["", "### 4. Generation and pre-tokenization at real size"]
    if gen:
        lines += ["", f"`bench/generate.py`: {gen['shape']} shape truncated to {gen['layers']} layers (hidden "
                  f"{gen['hidden']}, vocab {gen['vocab']}, random weights), {gen['size']} x {gen['size']} "
                  f"({gen['tokens_per_image']} tokens per image), {gen['dtype']}, CFG {gen['guidance']}; batched sampler "
                  "vs Lumina-mGPT's one image at a time (its unconditional branch a second batch-1 call per token).", "",
                  "| batched img/s | images | batch | one-at-a-time img/s | images | speed-up | identical images |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {gen['batched_images_per_s']:.3f} | {gen['num_images']} | {gen['batch_size']} | "
                  f"{gen['one_at_a_time_images_per_s']:.4f} | {gen.get('baseline_images', gen['num_images'])} | "
                  f"**{gen['speedup']:.1f}x** | {gen['identical_images']} |"]  # fmt: skip
    if pre:
        per_repeat = ", ".join(f"{r:.2f}" for r in pre.get("speedup_per_repeat", []))
        models = PRETOKENIZE_SIZES.get(pre["size"], pre["size"])
        lines += ["", f"`bench/pretokenize.py`: `--size {pre['size']}` ({models}; encoders {', '.join(pre['encoders'])}), "
                  f"{pre['device']}; our batched pipeline vs ARRA's one-image-at-a-time scripts, end to end.", "",
                  "| images | batch | workers | ours img/s | reference img/s | speed-up (median) | per repeat |",
                  "|---:|---:|---:|---:|---:|---:|---|",
                  f"| {pre['num_images']} | {pre['batch_size']} | {pre['num_workers']} | {pre['ours_images_per_s']:.1f} | "
                  f"{pre['reference_images_per_s']:.1f} | **{pre['speedup_median']:.1f}x** | {per_repeat} |"]  # fmt: skip
    return lines


def render_markdown(summary: dict) -> str:
    lines = []
    for section in (header, tests_section, kernels_section, train_section, generate_section):
        try:
            lines += section(summary)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            # a result of an unexpected shape (a bench script changed) costs its section, not the report
            lines += ["", f"({section.__name__} could not be rendered: {type(e).__name__}: {e}; see summary.json)"]
    return "\n".join(lines) + "\n"


def render_short(summary: dict) -> str:
    """The steps and the headline figures, for the end of the console output."""
    lines = [f"\n== arra_ds GPU check ({summary.get('mode')}): {summary.get('results', {}).get('env', {}).get('device')}"
             f", wall {_fmt(summary.get('wall_s'), '.0f')} s of {summary.get('budget_s')} s"]  # fmt: skip
    for part in summary.get("parts", []):
        steps = ", ".join(f"{s['name']} {s['status']} {_fmt(s.get('seconds'), '.0f')}s" for s in part["steps"])
        lines.append(f"  {part['key']:9} {steps}" + (f"  ({part['note']})" if part.get("note") else ""))
    results = summary.get("results", {})
    if "tests" in results:
        lines.append(f"  tests: {results['tests'].get('counts')}")
    for key in ("align_kernel", "lm_loss"):
        rows = results.get(key, {}).get("rows", [])
        if rows and rows[0].get("ms"):
            base = rows[0]
            cells = [f"{r['name']} {r['ms'] / base['ms']:.2f}x time" + (
                f" {r['peak_bytes'] / base['peak_bytes']:.3f}x mem" if r.get("peak_bytes") and base.get("peak_bytes")
                else "") if r.get("ms") else f"{r['name']} FAILED" for r in rows]  # fmt: skip
            lines.append(f"  {key} (vs eager): " + "; ".join(cells))
    train = results.get("train", {})
    for mode in ("arra", "ar"):
        if isinstance(train.get(mode), dict) and train[mode].get("results"):
            r = train[mode]["results"][0]
            lines.append(f"  train {mode} {r['layers']}L: {r['tokens_per_s_per_rank']:.0f} tok/s, step {r['step_ms']:.0f} ms"
                         f", MFU {_fmt(r.get('mfu'), '.1%')}, peak {_fmt(r.get('peak_mem_gib'), '.1f')} GiB"
                         f" (planned {_fmt(r.get('planned_peak_gib'), '.1f')})")  # fmt: skip
    if train.get("arra_over_ar_step_time"):
        lines.append(f"  ARRA / AR step time: {train['arra_over_ar_step_time']:.4f}")
    if "generate" in results:
        lines.append(f"  generate: batched / one-at-a-time = {results['generate']['speedup']:.1f}x")
    if "pretokenize" in results:
        lines.append(f"  pretokenize: ours / reference = {results['pretokenize']['speedup_median']:.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", help="summary.json of a suite run")
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.summary).read_text())
    print(render_short(summary) if args.short else render_markdown(summary), end="" if not args.short else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
