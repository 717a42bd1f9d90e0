"""The whole study in one call, resumable: data -> instruments -> runs and evaluations -> report.

    python launch/study.py --config configs/studies/demo_arra.yaml profile=cpu

    cfg = load_study_config("configs/studies/demo_arra.yaml", ["profile=smoke"])
    report = run_study(cfg)

A rerun of the same command continues where the last one stopped. It refuses a study directory made
with other settings, except for how the work is spread (parallel, threads, GPUs, progress bars) and
added arms or seeds.
"""

from __future__ import annotations

import contextlib
import resource
import shlex
import sys
import time
from pathlib import Path

import yaml

from arra_ds.config import save_config, to_dict
from arra_ds.demo.attributes import load_attribute_net
from arra_ds.errors import ConfigError
from arra_ds.io import append_jsonl, atomic_write_json, read_jsonl
from arra_ds.study.config import StudyConfig
from arra_ds.study.data import prepare_data
from arra_ds.study.judge import prompt_fidelity
from arra_ds.study.paths import StudyPaths
from arra_ds.study.report import write_report
from arra_ds.study.runs import (
    EVAL_LOG,
    FIDELITY_FILE,
    RUN_CONFIG_NAME,
    TRAIN_LOG,
    Scheduler,
    StudyRunError,
    Task,
    checkpoint_committed,
    eval_command,
    eval_config,
    judge_weights,
    last_logged_step,
    run_finished,
    train_command,
    train_run_config,
    visible_gpus,
)
from arra_ds.study.setup import READ_BATCH, heldout_items, judge_pictures, prepare_instruments, read_pictures

# Settings a rerun may change: they spread the work, they do not change a number.
FREE_KEYS = ("parallel", "threads_per_process", "gpus", "progress_bar", "run_arms", "seeds", "arms", "launcher")


def check_study_dir(cfg: StudyConfig, paths: StudyPaths) -> None:
    """Write the resolved config on the first run; on a rerun refuse settings that would mix studies."""
    if not paths.config.is_file():
        paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)
        return
    previous = yaml.safe_load(paths.config.read_text())
    current = to_dict(cfg)
    changed = sorted(k for k in set(previous) | set(current) if k not in FREE_KEYS and previous.get(k) != current.get(k))
    old_arms = {arm["name"]: arm for arm in previous.get("arms", [])}
    changed += [f"arms[{arm['name']}]" for arm in current["arms"] if arm["name"] in old_arms and old_arms[arm["name"]] != arm]
    if changed:
        raise ConfigError(
            f"{paths.root} holds a study made with other settings ({', '.join(changed)} differ); use a new "
            "output_dir, or delete that directory to start over"
        )
    save_config(cfg, paths.config)  # records added arms / seeds


def score_fidelity(eval_dir: Path, weights: Path) -> dict:
    """The judge reads every generated picture of an evaluation; ``fidelity.json`` beside its report."""
    samples = read_jsonl(eval_dir / "samples.jsonl")
    net = load_attribute_net(weights)
    seen = []
    for start in range(0, len(samples), READ_BATCH):
        chunk = samples[start : start + READ_BATCH]
        seen.extend(judge_pictures(net, read_pictures(eval_dir / s["file"] for s in chunk)))
    result = prompt_fidelity(seen, [s["prompt"] for s in samples])
    result["per_sample"] = [{"index": s["index"], "prompt": s["prompt"], "seen": a.as_dict()} for s, a in zip(samples, seen)]
    atomic_write_json(eval_dir / FIDELITY_FILE, result)
    return result


def build_tasks(cfg: StudyConfig, paths: StudyPaths) -> list[Task]:
    """Training runs in seed-major order (both arms of seed 0 first) and the evaluation of every
    evaluated checkpoint; writes each process's config file."""
    tasks = []
    max_steps = cfg.run.train.max_steps
    for seed in cfg.seeds:
        for arm in cfg.selected_arms():
            run = train_run_config(cfg, paths, arm, seed)
            run.validate()
            run_dir = paths.run_dir(arm.name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            run_file = run_dir / RUN_CONFIG_NAME
            save_config(run, run_file)
            train_name = f"train {arm.name}/seed_{seed}"
            tasks.append(Task(
                name=train_name,
                command=lambda gpu, f=run_file: train_command(cfg, f, gpu),
                log=run_dir / TRAIN_LOG,
                done=lambda d=run_dir: run_finished(d, max_steps),
                ready=lambda: True,
            ))
            for step in cfg.eval_steps():
                eval_dir = paths.eval_dir(arm.name, seed, step)
                eval_file = eval_dir.with_suffix(".yaml")
                eval_file.parent.mkdir(parents=True, exist_ok=True)
                save_config(eval_config(cfg, paths, arm.name, seed, step), eval_file)
                tasks.append(Task(
                    name=f"eval {arm.name}/seed_{seed}/step_{step}",
                    command=lambda gpu, f=eval_file: eval_command(f, gpu),
                    log=eval_dir.parent / f"step_{step}.{EVAL_LOG}",
                    done=lambda d=eval_dir: (d / FIDELITY_FILE).is_file(),
                    ready=lambda c=paths.checkpoint(arm.name, seed, step): checkpoint_committed(c),
                    after=lambda d=eval_dir: score_fidelity(d, judge_weights(paths)),
                    is_eval=True,
                    depends_on=train_name,
                ))
    return tasks


class StageClock:
    """Wall and CPU seconds (this process and the processes it waited for) of each stage of one
    invocation; appended to ``timing.jsonl`` so that a resumed study still reports every stage."""

    def __init__(self, paths: StudyPaths):
        self.paths = paths
        self.record: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @contextlib.contextmanager
    def stage(self, name: str):
        wall, cpu = time.perf_counter(), self._cpu()
        try:
            yield
        finally:
            self.record["stages"][name] = {"wall_s": time.perf_counter() - wall, "cpu_s": self._cpu() - cpu}

    def save(self, task_durations: dict[str, float]) -> list[dict]:
        self.record["tasks_wall_s"] = task_durations
        append_jsonl(self.paths.timing, self.record)
        return read_jsonl(self.paths.timing)


def run_study(cfg: StudyConfig, command: str = "") -> dict:
    """Run (or resume) the study; returns the report."""
    paths = StudyPaths(Path(cfg.output_dir))
    check_study_dir(cfg, paths)
    clock = StageClock(paths)
    runs = [paths.run_dir(arm.name, seed) for seed in cfg.seeds for arm in cfg.selected_arms()]
    scheduler = Scheduler(cfg.parallel, cfg.threads_per_process, visible_gpus(cfg), cfg.progress_bar)
    with clock.stage("data"):
        data_summary = prepare_data(cfg, paths)
    with clock.stage("instruments"):
        setup = prepare_instruments(cfg, paths, data_summary)
    with clock.stage("runs"):
        failures = scheduler.run(
            build_tasks(cfg, paths), train_total=len(runs) * cfg.run.train.max_steps,
            step_counter=lambda: sum(last_logged_step(r) for r in runs),
        )
    timing = clock.save(scheduler.durations)
    report = write_report(cfg, paths, setup, command or shlex.join(sys.argv), timing, heldout_items(paths))
    if failures:
        raise StudyRunError(
            f"{len(failures)} task(s) of the study failed (the report covers the rest; rerun the same command to "
            "resume):\n" + "\n".join(failures)
        )
    print(f"study done: {paths.report_md}", flush=True)
    for line in report["verdict"]:
        print(line, flush=True)
    return report
