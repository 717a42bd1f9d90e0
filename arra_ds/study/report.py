"""The study's report: ``report.json``, ``report.md``, ``curves.png`` and ``samples.png``.

Per arm and evaluated step: mean and standard deviation over the training seeds of every metric;
per arm against the baseline: the paired (same seed) difference, its mean and standard deviation,
how many seeds favour the arm, and whether the difference is larger than the seed-to-seed spread,
read as: |mean difference| > the larger of the two arms' seed standard deviations.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
from PIL import Image

from arra_ds.io import atomic_write, atomic_write_json, read_jsonl
from arra_ds.study.config import StudyConfig
from arra_ds.study.paths import StudyPaths
from arra_ds.study.runs import FIDELITY_FILE, SCENE_EXTRACTOR


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    better: str  # "higher", "lower" or "" (neither: a property, not a quality)
    source: str  # "fidelity" (the judge) or "eval" (launch/eval.py's report)
    key: str


METRICS = (
    Metric("fidelity_all", "prompt fidelity: whole prompt", "higher", "fidelity", "all"),
    Metric("fidelity_background", "fidelity: background", "higher", "fidelity", "background"),
    Metric("fidelity_count", "fidelity: count", "higher", "fidelity", "count"),
    Metric("fidelity_positions", "fidelity: positions", "higher", "fidelity", "positions"),
    Metric("fidelity_colours", "fidelity: colours", "higher", "fidelity", "colours"),
    Metric("fidelity_shapes", "fidelity: shapes", "higher", "fidelity", "shapes"),
    Metric("fidelity_sizes", "fidelity: sizes", "higher", "fidelity", "sizes"),
    Metric("fid_scene", f"FID ({SCENE_EXTRACTOR} features)", "lower", "eval", f"fid_{SCENE_EXTRACTOR}"),
    Metric("clip_score", "CLIP-Score (study CLIP)", "higher", "eval", "clip_score"),
    Metric("ms_ssim_paired", "MS-SSIM to the real picture", "higher", "eval", "ms_ssim_paired"),
    Metric("ms_ssim_diversity", "MS-SSIM among samples (lower = more diverse)", "", "eval", "ms_ssim_diversity"),
)
HEADLINE = ("fidelity_all", "fid_scene", "clip_score")
CURVE_METRICS = ("fidelity_all", "fid_scene", "clip_score", "ms_ssim_diversity")
TRAIN_CURVES = (("loss_ar", "train loss_ar (next-token CE)"), ("cos", "train alignment cosine"))


def _stats(values: list[float]) -> dict:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(clean)
    return {
        "mean": float(np.mean(clean)) if n else None,
        "std": float(np.std(clean, ddof=1)) if n > 1 else None,
        "n": n,
        "values": values,
    }


def eval_metrics(eval_dir: Path) -> dict | None:
    """The metrics of one evaluated checkpoint, or None if it is not complete."""
    report, fidelity = eval_dir / "report.json", eval_dir / FIDELITY_FILE
    if not (report.is_file() and fidelity.is_file()):
        return None
    sources = {"eval": json.loads(report.read_text())["metrics"], "fidelity": json.loads(fidelity.read_text())}
    return {m.name: sources[m.source].get(m.key) for m in METRICS}


def collect(cfg: StudyConfig, paths: StudyPaths) -> dict:
    """arm -> step -> metric -> per-seed values (None where missing)."""
    results: dict = {}
    for arm in cfg.selected_arms():
        results[arm.name] = {}
        for step in cfg.eval_steps():
            rows = [eval_metrics(paths.eval_dir(arm.name, seed, step)) for seed in cfg.seeds]
            results[arm.name][step] = {m.name: [None if r is None else r[m.name] for r in rows] for m in METRICS}
    return results


def training_curves(cfg: StudyConfig, paths: StudyPaths) -> dict:
    """arm -> quantity -> {"steps": [...], "values": [[per seed] per step]} from the runs' metrics.jsonl."""
    curves: dict = {}
    for arm in cfg.selected_arms():
        per_seed = []
        for seed in cfg.seeds:
            file = paths.run_dir(arm.name, seed) / "metrics.jsonl"
            per_seed.append({row["step"]: row for row in read_jsonl(file)} if file.is_file() else {})
        steps = sorted(set().union(*[set(rows) for rows in per_seed]))
        curves[arm.name] = {
            name: {"steps": steps, "values": [[rows.get(s, {}).get(name) for rows in per_seed] for s in steps]}
            for name, _ in TRAIN_CURVES
        }
    return curves


def compare(cfg: StudyConfig, results: dict) -> dict:
    """arm -> step -> metric -> paired difference (arm - baseline) against the seed spread."""
    base = results[cfg.baseline]
    better_sign = {m.name: {"higher": 1, "lower": -1, "": 0}[m.better] for m in METRICS}
    out: dict = {}
    for arm, by_step in results.items():
        if arm == cfg.baseline:
            continue
        out[arm] = {}
        for step, metrics in by_step.items():
            out[arm][step] = {}
            for name, values in metrics.items():
                pairs = [(a, b) for a, b in zip(values, base[step][name]) if a is not None and b is not None]
                diffs = [a - b for a, b in pairs]
                stats = _stats(diffs)
                spread = [s for s in (_stats(values)["std"], _stats(base[step][name])["std"]) if s is not None]
                seed_spread = max(spread) if len(spread) == 2 else None
                stats["seed_spread"] = seed_spread
                stats["exceeds_spread"] = (
                    None if stats["mean"] is None or seed_spread is None else bool(abs(stats["mean"]) > seed_spread)
                )
                stats["seeds_favouring_arm"] = (
                    sum(1 for d in diffs if d * better_sign[name] > 0) if better_sign[name] else None
                )
                out[arm][step][name] = stats
    return out


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(values: list) -> str:
    s = _stats(values)
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"


def verdict_lines(cfg: StudyConfig, results: dict, differences: dict, label: dict) -> list[str]:
    """Plain sentences: does the treatment beat the baseline by more than the seed spread, at the last step?"""
    last = cfg.eval_steps()[-1]
    arm = cfg.treatment
    lines = []
    for name in HEADLINE:
        metric = next(m for m in METRICS if m.name == name)
        d = differences[arm][last][name]
        if d["mean"] is None:
            lines.append(f"- {metric.label}: not measured (missing evaluations).")
            continue
        signed = d["mean"] * {"higher": 1, "lower": -1}[metric.better]
        direction = "better" if signed > 0 else "worse" if signed < 0 else "no difference"
        if d["exceeds_spread"] is None:
            spread = "the seed spread is unknown (fewer than two seeds per arm)"
        elif d["exceeds_spread"]:
            spread = f"this is LARGER than the seed-to-seed spread ({d['seed_spread']:.3f})"
        else:
            spread = f"this is NOT larger than the seed-to-seed spread ({d['seed_spread']:.3f})"
        lines.append(
            f"- {metric.label}: {label[arm]} {_mean_std(results[arm][last][name])} vs {label[cfg.baseline]} "
            f"{_mean_std(results[cfg.baseline][last][name])}; difference {d['mean']:+.3f} ({direction}), "
            f"{d['seeds_favouring_arm']}/{d['n']} seeds favour {label[arm]}; {spread}."
        )
    return lines


def plot_curves(cfg: StudyConfig, results: dict, train: dict, label: dict, out: Path) -> None:
    panels = [(name, next(m.label for m in METRICS if m.name == name)) for name in CURVE_METRICS] + list(TRAIN_CURVES)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5 * columns, 3.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (name, title) in zip(axes.flat, panels):
        for arm in results:
            if name in results[arm][cfg.eval_steps()[0]]:
                steps = cfg.eval_steps()
                stats = [_stats(results[arm][s][name]) for s in steps]
            else:
                steps = train[arm][name]["steps"]
                stats = [_stats(v) for v in train[arm][name]["values"]]
            points = [(s, st["mean"], st["std"] or 0.0) for s, st in zip(steps, stats) if st["mean"] is not None]
            if not points:
                continue
            x, mean, std = (np.asarray(v, dtype=float) for v in zip(*points))
            (line,) = ax.plot(x, mean, marker="o" if len(x) < 20 else None, label=label[arm])
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"mean ± std over seeds {cfg.seeds} (band)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_samples(cfg: StudyConfig, paths: StudyPaths, label: dict, real_images: list[Path], out: Path) -> None:
    """Real pictures, then per seed a baseline row and a treatment row (same prompts, same sampling
    seeds, last step)."""
    last = cfg.eval_steps()[-1]
    shown = min(cfg.eval.samples_shown, len(real_images), cfg.eval.num_prompts)
    rows = [("real (VQ)", [real_images[i] for i in range(shown)])]
    for seed in cfg.seeds:
        for arm in (cfg.baseline, cfg.treatment):
            images = paths.eval_dir(arm, seed, last) / "images"
            files = [images / f"{i * cfg.eval.samples_per_prompt:06d}.png" for i in range(shown)]
            rows.append((f"{label[arm]}\nseed {seed}", files))
    fig = Figure(figsize=(1.6 * shown, 1.7 * len(rows)))
    axes = fig.subplots(len(rows), shown, squeeze=False)
    for r, (name, files) in enumerate(rows):
        for c, file in enumerate(files):
            ax = axes[r][c]
            if Path(file).is_file():
                ax.imshow(np.asarray(Image.open(file).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(c + 1), fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"held-out prompts 1-{shown} (listed in report.md), step {last}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def summarise_timing(timing: list[dict]) -> dict:
    """Per stage, wall and CPU seconds summed over invocations; per kind of process, wall seconds."""
    stages: dict = {}
    for record in timing:
        for name, value in record["stages"].items():
            total = stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            total["wall_s"] += value["wall_s"]
            total["cpu_s"] += value["cpu_s"]
    tasks = {name: seconds for record in timing for name, seconds in record.get("tasks_wall_s", {}).items()}
    return {
        "invocations": len(timing),
        "wall_s": sum(v["wall_s"] for v in stages.values()),
        "cpu_s": sum(v["cpu_s"] for v in stages.values()),
        "stages": stages,
        "training_run_wall_s": _stats([v for k, v in tasks.items() if k.startswith("train ")]),
        "evaluation_wall_s": _stats([v for k, v in tasks.items() if k.startswith("eval ")]),
    }


def write_report(cfg: StudyConfig, paths: StudyPaths, setup: dict, command: str, timing: list[dict],
                 heldout: list[dict]) -> dict:
    label = {arm.name: arm.label or arm.name for arm in cfg.selected_arms()}
    results = collect(cfg, paths)
    differences = compare(cfg, results)
    train = training_curves(cfg, paths)
    verdict = verdict_lines(cfg, results, differences, label)
    plot_curves(cfg, results, train, label, paths.curves)
    plot_samples(cfg, paths, label, [item["image"] for item in heldout], paths.samples)
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count() or 0},
        "timing": summarise_timing(timing),
        "profile": cfg.profile,
        "seeds": cfg.seeds,
        "arms": {arm.name: {"label": label[arm.name], "overrides": arm.overrides} for arm in cfg.selected_arms()},
        "baseline": cfg.baseline,
        "treatment": cfg.treatment,
        "eval_steps": cfg.eval_steps(),
        "metrics": {m.name: {"label": m.label, "better": m.better} for m in METRICS},
        "setup": setup,
        "results": {arm: {str(s): {k: _stats(v) for k, v in m.items()} for s, m in steps.items()} for arm, steps in results.items()},
        "differences": {arm: {str(s): m for s, m in steps.items()} for arm, steps in differences.items()},
        "training_curves": train,
        "verdict": verdict,
    }
    atomic_write_json(paths.report_json, report)
    atomic_write(paths.report_md, _markdown(cfg, report, label, heldout))
    return report


def _timing_line(timing: dict, parallel: int) -> str:
    stages = ", ".join(f"{name} {value['wall_s'] / 60:.1f}" for name, value in timing["stages"].items())
    train, evaluation = timing["training_run_wall_s"], timing["evaluation_wall_s"]
    per_task = []
    if train["mean"] is not None:
        per_task.append(f"a training run {train['mean'] / 60:.1f} min")
    if evaluation["mean"] is not None:
        per_task.append(f"an evaluation {evaluation['mean'] / 60:.1f} min")
    tasks = f"; {' and '.join(per_task)} on average, {parallel} at a time" if per_task else ""
    return (f"Time: {timing['wall_s'] / 60:.1f} min wall, {timing['cpu_s'] / 60:.1f} min CPU, over {timing['invocations']} "
            f"invocation(s) (minutes: {stages}){tasks}.")


def _arm_list(arms: dict) -> str:
    return ", ".join(f"**{v['label']}** (`{' '.join(v['overrides']) or 'no overrides'}`)" for v in arms.values())


def _markdown(cfg: StudyConfig, report: dict, label: dict, heldout: list[dict]) -> str:
    setup = report["setup"]
    steps = [str(s) for s in cfg.eval_steps()]
    last = steps[-1]
    run = cfg.run
    lines = [
        f"# Does ARRA help? Study report (profile `{cfg.profile}`)",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs.  ",
        _timing_line(report["timing"], cfg.parallel),
        "",
        f"Arms: {_arm_list(report['arms'])}; "
        f"seeds {cfg.seeds}; {run.train.max_steps} steps of {run.train.micro_batch_size} samples from random init "
        f"(debug Chameleon, hidden {run.model.debug.hidden_size}, {run.model.debug.num_hidden_layers} layers); "
        f"{cfg.scenes.code_size} x {cfg.scenes.code_size} codes ({cfg.scenes.image_size} px), "
        f"{cfg.scenes.train_scenes} train scenes, evaluated on {cfg.eval.num_prompts} held-out prompts "
        f"(captions never trained on) x {cfg.eval.samples_per_prompt} samples at steps {', '.join(steps)}.",
        "",
        "## Verdict at the last step",
        "",
        *report["verdict"],
        "",
        "A difference counts as larger than the seed-to-seed spread when |mean difference| exceeds the larger of the "
        "two arms' standard deviations over seeds.",
        "",
        "## Instruments",
        "",
        f"- Target encoder: the study's CLIP (`{setup['clip']['dir']}`), top-1 picture -> caption retrieval among "
        f"{setup['clip']['num_captions']} held-out captions: {_fmt(setup['clip']['retrieval_top1_heldout_drawn'])} (drawn), "
        f"{_fmt(setup['clip']['retrieval_top1_heldout_reconstructed'])} (VQ-reconstructed).",
        "- Judge (attribute model, also the FID feature network) on held-out reconstructions: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in setup["judge"]["attribute_accuracy_heldout"].items()) + ".",
        f"- Ceiling ({setup['ceiling']['what']}): prompt fidelity {_fmt(setup['ceiling']['fidelity']['all'])}, "
        f"CLIP-Score {_fmt(setup['ceiling']['clip_score'])}.",
        f"- Chance ({setup['chance']['what']}): prompt fidelity {_fmt(setup['chance']['fidelity']['all'])}, "
        f"CLIP-Score {_fmt(setup['chance']['clip_score'])}.",
        f"- FID reference: {setup['fid_reference']['what']}; FID floor ({setup['fid_floor']['what']}): "
        f"{_fmt(setup['fid_floor']['fid_scene'])}.",
        "",
        f"## Every metric at step {last} (mean ± std over seeds)",
        "",
        "| metric | " + " | ".join(label[a] for a in report["arms"]) + " | ceiling (FID: floor) | chance |",
        "|---|" + "---|" * (len(report["arms"]) + 2),
    ]
    for m in METRICS:
        ceiling = setup["ceiling"]["fidelity"].get(m.key) if m.source == "fidelity" else setup["ceiling"].get(m.name)
        if m.name == "fid_scene":
            ceiling = setup["fid_floor"]["fid_scene"]  # a perfect generator's FID at this sample size
        chance = setup["chance"]["fidelity"].get(m.key) if m.source == "fidelity" else setup["chance"].get(m.name)
        row = [_mean_std(report["results"][a][last][m.name]["values"]) for a in report["arms"]]
        lines.append(f"| {m.label} | " + " | ".join(row) + f" | {_fmt(ceiling)} | {_fmt(chance)} |")
    lines += ["", "## Differences from the baseline (same seed; mean ± std of the paired differences)", ""]
    for arm, by_step in report["differences"].items():
        lines += [f"### {label[arm]} − {label[cfg.baseline]}", "",
                  "| step | " + " | ".join(next(m.label for m in METRICS if m.name == h) for h in HEADLINE) + " |",
                  "|---|" + "---|" * len(HEADLINE)]
        for step in steps:
            cells = []
            for name in HEADLINE:
                d = by_step[step][name]
                if d["mean"] is None:
                    cells.append("n/a")
                    continue
                std = f" ± {d['std']:.3f}" if d["std"] is not None else ""
                mark = {True: " (> spread)", False: " (within spread)", None: ""}[d["exceeds_spread"]]
                favour = f", {d['seeds_favouring_arm']}/{d['n']} seeds" if d["seeds_favouring_arm"] is not None else ""
                cells.append(f"{d['mean']:+.3f}{std}{mark}{favour}")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Curves and samples",
        "",
        "![curves](curves.png)",
        "",
        "`curves.png`: evaluated metrics and the training losses against the step, one line per arm, band = ± one "
        "standard deviation over seeds.",
        "",
        "![samples](samples.png)",
        "",
        "`samples.png`: the first held-out prompts (same sampling seeds in every row), real VQ reconstruction on top:",
        "",
    ]
    lines += [f"{i + 1}. {item['caption']}" for i, item in enumerate(heldout[: min(cfg.eval.samples_shown, cfg.eval.num_prompts)])]
    lines += [
        "",
        "## Notes",
        "",
        f"- Sampling: guidance scale {cfg.eval.guidance_scale} (the runs never see an empty prompt, so classifier-free "
        f"guidance has no trained unconditional branch), image top-k {cfg.eval.image_top_k}, temperature "
        f"{cfg.eval.temperature}, the same sampling seed ({cfg.eval.seed}) for every arm and training seed.",
        "- The judge reads each 16-px patch's mean colour; prompt fidelity asks for the right background, number of "
        "shapes, places (any corners for counted captions), colours, kinds and (where the caption states it) sizes.",
        "- Full numbers: `report.json`; per-run logs: `runs/<arm>/seed_<s>/train.log`, evaluations in `runs/<arm>/seed_<s>/eval/`.",
        "",
    ]
    return "\n".join(lines)
