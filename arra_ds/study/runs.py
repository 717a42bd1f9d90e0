"""The study's training runs and evaluations, each a process of the real launchers, a few at a time.

    training    deepspeed --num_gpus 1 launch/train.py --ds_config ds_configs/zero3.json --config <run>/study_run.yaml
                (or python launch/train.py ..., study.launcher=python); train.resume=auto
    evaluation  python launch/eval.py --config <run>/eval/step_<n>.yaml, then the judge reads the pictures

Every arm of one seed trains with the same RunConfig seed, hence the same initialisation of the
backbone (the projector is built after it) and the same data order. A task is done when its output
is complete (a run's summary at max_steps, an evaluation's fidelity.json), so a rerun starts only
what is missing; a training run that was stopped resumes from its latest checkpoint. Evaluations
start as soon as their checkpoint is committed, also while the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from arra_ds.checkpoints import MANIFEST
from arra_ds.config import apply_overrides, from_dict, to_dict
from arra_ds.demo.attributes import WEIGHTS_FILE
from arra_ds.errors import UserError
from arra_ds.eval.msssim import MSSSIMConfig
from arra_ds.eval.runner import EvalConfig
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.io import read_jsonl
from arra_ds.study.config import ArmConfig, StudyConfig
from arra_ds.study.paths import StudyPaths
from arra_ds.train.run_config import REPO_ROOT, RunConfig

RUN_CONFIG_NAME = "study_run.yaml"
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"
FIDELITY_FILE = "fidelity.json"
SCENE_EXTRACTOR = "scene"
POLL_SECONDS = 2.0
LOG_TAIL_CHARS = 3000
DEEPSPEED_INCLUDE = "--include"


class StudyRunError(UserError, RuntimeError):
    """Training runs or evaluations of the study failed; the message names their logs."""


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of one training run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what each process runs ----------------------------------------------------------------------


def train_run_config(cfg: StudyConfig, paths: StudyPaths, arm: ArmConfig, seed: int) -> RunConfig:
    """The arm's RunConfig for one seed: the study's ``run`` section, the per-run settings the study
    decides (run dir, seed, data, sizes, checkpoints for every evaluated step), then the arm's overrides."""
    scenes = cfg.scenes
    rep_data = cfg.arm_needs_rep_data(arm)
    study_keys = [
        f"output_dir={paths.run_dir(arm.name, seed)}",
        f"seed={seed}",
        f"data.path={paths.mds('train_rep' if rep_data else 'train')}",
        f"data.max_seq_len={scenes.max_sequence_length(rep_data)}",
        "data.overlong=error",
        f"model.debug.num_image_codes={scenes.num_image_codes}",
        f"align.encoder={cfg.clip.name}",
        f"align.slice_len={scenes.grid.body_length}",  # target=slice: the last positions, as many as the image body
        "train.resume=auto",
        "train.keep_last=0",
        f"train.save_every={cfg.eval.every or cfg.run.train.max_steps}",
        "train.progress_bar=false",
    ]
    data = apply_overrides(to_dict(cfg.run), [*study_keys, *arm.overrides])
    run = from_dict(RunConfig, data)
    return run


def eval_config(cfg: StudyConfig, paths: StudyPaths, arm: str, seed: int, step: int) -> EvalConfig:
    px = cfg.scenes.image_size
    return EvalConfig(
        model=str(paths.checkpoint(arm, seed, step)),
        vqgan_config=str(paths.vqgan_yaml),
        vqgan_checkpoint=str(paths.vqgan_ckpt),
        prompts=str(paths.heldout_prompts if cfg.eval.paired_ms_ssim else paths.eval_prompts_text),
        num_prompts=cfg.eval.num_prompts,
        samples_per_prompt=cfg.eval.samples_per_prompt,
        batch_size=cfg.eval.batch_size,
        output_dir=str(paths.eval_dir(arm, seed, step)),
        sampling=SamplingConfig(
            guidance_scale=cfg.eval.guidance_scale, image_top_k=cfg.eval.image_top_k, temperature=cfg.eval.temperature,
            height=px, width=px, seed=cfg.eval.seed,
        ),
        progress_bar=False,
        extractors=[SCENE_EXTRACTOR],
        extractor_weights={SCENE_EXTRACTOR: str(judge_weights(paths))},
        reference="",  # real pictures of the evaluated prompts: statistics computed once by the study
        reference_stats={SCENE_EXTRACTOR: str(reference_stats_file(paths))},
        clip_model=f"local-dir:{paths.clip}",
        ms_ssim_config=MSSSIMConfig(win_size=cfg.eval.ms_ssim_win_size),
    )


def judge_weights(paths: StudyPaths) -> Path:
    return paths.judge / WEIGHTS_FILE


def reference_stats_file(paths: StudyPaths) -> Path:
    return paths.reference / f"{SCENE_EXTRACTOR}.npz"


def run_finished(run_dir: Path, max_steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    data = json.loads(summary.read_text())
    return data.get("steps") == max_steps and not data.get("preempted")


def last_logged_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    rows = read_jsonl(metrics)
    return int(rows[-1]["step"]) if rows else 0


# ---- tasks and the scheduler ---------------------------------------------------------------------


@dataclass
class Task:
    name: str
    command: Callable[[int | None], list[str]]  # GPU id (None: CPU) -> the command line, built when it starts
    log: Path
    done: Callable[[], bool]
    ready: Callable[[], bool]
    after: Callable[[], None] = lambda: None  # runs in the study's process when the command succeeded
    is_eval: bool = False
    depends_on: str = ""  # the task whose failure makes this one impossible


@dataclass
class Running:
    task: Task
    process: subprocess.Popen
    slot: int
    log_file: object
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Scheduler:
    """Runs tasks as processes, at most ``parallel`` at a time; ready evaluations go first (they are
    short and their checkpoints are already there), then training runs in their given order."""

    parallel: int
    threads: int
    gpus: list[int] = field(default_factory=list)
    progress: bool = True
    durations: dict[str, float] = field(default_factory=dict)  # task name -> wall seconds of its process

    def _gpu(self, slot: int) -> int | None:
        return self.gpus[slot % len(self.gpus)] if self.gpus else None

    def _env(self, gpu: int | None, command: list[str]) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        if DEEPSPEED_INCLUDE in command:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # the deepspeed launcher picks the device (--include) itself
        else:
            env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
        return env

    def _start(self, task: Task, slot: int) -> Running:
        gpu = self._gpu(slot)
        command = task.command(gpu)
        task.log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(task.log, "a")
        log_file.write(f"\n$ {' '.join(command)}\n")
        log_file.flush()
        # A session of its own: stopping the study stops the launcher and its ranks together.
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=self._env(gpu, command), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        return Running(task, process, slot, log_file)

    def run(self, tasks: list[Task], train_total: int, step_counter: Callable[[], int]) -> list[str]:
        """Run every task that is not done; returns the failures (name: log tail)."""
        pending = [t for t in tasks if not t.done()]
        failed: dict[str, str] = {}
        running: list[Running] = []
        evals_total = sum(t.is_eval for t in tasks)
        train_bar = tqdm(total=train_total, initial=step_counter(), desc="study: training steps", disable=not self.progress,
                         dynamic_ncols=True, position=0)
        eval_bar = tqdm(total=evals_total, initial=evals_total - sum(t.is_eval for t in pending), desc="study: evaluations",
                        disable=not self.progress, dynamic_ncols=True, position=1)
        # SIGTERM (kill, a scheduler's time limit) stops the study like Ctrl-C: its processes are stopped too
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
        try:
            while pending or running:
                for r in list(running):
                    code = r.process.poll()
                    if code is None:
                        continue
                    r.log_file.close()
                    running.remove(r)
                    self.durations[r.task.name] = time.perf_counter() - r.started
                    if code != 0:
                        failed[r.task.name] = f"exit code {code}; log {r.task.log}:\n{_tail(r.task.log)}"
                        tqdm.write(f"study: {r.task.name} failed (exit code {code}); log: {r.task.log}")
                    elif self._after(r.task, failed):
                        eval_bar.update(int(r.task.is_eval))
                pending = [t for t in pending if t.depends_on not in failed]
                free_slots = sorted(set(range(self.parallel)) - {r.slot for r in running})
                while free_slots:
                    candidates = [t for t in pending if t.ready()]
                    if not candidates:
                        break
                    task = next((t for t in candidates if t.is_eval), candidates[0])
                    pending.remove(task)
                    running.append(self._start(task, free_slots.pop(0)))
                if not running and pending:
                    names = ", ".join(t.name for t in pending[:5])
                    raise StudyRunError(f"tasks {names} wait for checkpoints that no running task will write")
                train_bar.n = step_counter()
                train_bar.set_postfix_str(", ".join(r.task.name for r in running), refresh=True)
                if running:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            for r in running:
                _stop(r.process)
                r.log_file.close()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            train_bar.close()
            eval_bar.close()
        return [f"{name}: {why}" for name, why in failed.items()]

    @staticmethod
    def _after(task: Task, failed: dict) -> bool:
        try:
            task.after()
        except Exception:  # the command succeeded but reading its output did not: report it (with the traceback), go on
            failed[task.name] = traceback.format_exc()
            return False
        return True


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-LOG_TAIL_CHARS:]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's session (the launcher and its ranks), then wait."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def train_command(cfg: StudyConfig, config_file: Path, gpu: int | None) -> list[str]:
    """One rank: ``deepspeed --num_gpus 1`` on CPU, ``--include localhost:<gpu>`` on a GPU."""
    script = str(REPO_ROOT / "launch" / "train.py")
    tail = [script, "--ds_config", str(cfg.ds_config_path()), "--config", str(config_file)]
    if cfg.launcher == "python":
        return [sys.executable, *tail]
    launcher = Path(sys.executable).parent / "deepspeed"
    devices = ["--num_gpus", "1"] if gpu is None else [DEEPSPEED_INCLUDE, f"localhost:{gpu}"]
    return [str(launcher if launcher.exists() else "deepspeed"), *devices, "--master_port", str(free_port()), *tail]


def eval_command(config_file: Path, gpu: int | None = None) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "launch" / "eval.py"), "--config", str(config_file)]


def visible_gpus(cfg: StudyConfig) -> list[int]:
    if cfg.gpus:
        return list(cfg.gpus)
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def checkpoint_committed(path: Path) -> bool:
    return (path / MANIFEST).is_file()
