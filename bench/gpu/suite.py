"""The whole GPU check in one device call: the `gpu` tests, the kernel benchmarks at the 7B shapes, the
Chameleon-7B training step's MFU with ARRA on and off, and real-size generation and pre-tokenization.

Started by bench/gpu/run.sh (which sets the environment); runs each step as a subprocess with its own
timeout and writes everything into one folder (``$OUT`` on the GPU machine), at most 8 files:

    summary.json     every figure, with device, date, versions, budgets and the exact commands
    RESULTS_gpu.md   the bench/RESULTS.md section made from it (bench/gpu/report.py)
    setup.log        offline install, versions, nvidia-smi
    tests.log        pytest -m gpu          tests.xml   its JUnit report
    kernels.log      bench/align_kernel.py, bench/lm_loss.py
    train.log        bench/train_throughput.py, ARRA on then off (one process each)
    generate.log     bench/generate.py, bench/pretokenize.py

Budgets: step i may run until the planned end of its part less the budgets of the part's steps still
to come, so time a step leaves unused passes to the next ones and no step can eat a later step's own
budget; the whole run ends within the sum of the budgets. ``--cpu-smoke`` runs the same steps at tiny
sizes on the CPU (Triton interpreter). Standard library only: this process never imports torch.

    python bench/gpu/suite.py --out DIR [--cpu-smoke] [--parts tests,kernels,train,generate]
    python bench/gpu/suite.py --plan [--cpu-smoke]     # the steps, commands and budgets; runs nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

if __package__:  # imported as bench.gpu.suite (tests/test_gpu_suite.py)
    from . import report
else:  # run as a script: its folder is on sys.path
    import report

REPO = Path(__file__).resolve().parents[2]

# How to start it through the device tool (README "Benchmarks" and bench/gpu/README.md say the same).
DEVICE_COMMAND = "bash bench/gpu/run.sh"
DEVICE_CARRY = [".gpu_wheels"]
DEVICE_TIMEOUT_S = 510
# The device tool returns at most 8 files of at most 16 MiB from $OUT.
MAX_OUT_FILES = 8
OUT_FILES = ("summary.json", "RESULTS_gpu.md", "setup.log", "tests.log", "tests.xml", "kernels.log", "train.log",
             "generate.log")  # fmt: skip
LOG_CAP_BYTES = 12 * 2**20
PARTS = ("tests", "kernels", "train", "generate")
# Chameleon-7B's decoder depth, and the depth the training step falls back to if 32 layers fail (memory).
FULL_LAYERS = 32
FALLBACK_LAYERS = 8
# Generation: 16 of the 32 layers (the batched / one-at-a-time ratio is per layer; all 32 at one image at a
# time would take most of a minute on their own).
GENERATE_LAYERS = 16
# Seconds each step may take: (on the GPU, in --cpu-smoke). The GPU column's primary steps add up to 455 s,
# the install included: under the 9 minutes, leaving device time for one rerun. The fallback steps
# run inside the train part's budget. (bench/gpu/README.md gives the reasons for each size.)
BUDGET_S = {
    "install": (45, 30), "env": (20, 60), "nvidia-smi": (5, 10), "pytest": (70, 120),
    "align_kernel": (35, 120), "lm_loss": (60, 120),
    "train arra": (85, 150), "train ar": (65, 150), "fallback arra": (45, 150), "fallback ar": (40, 150),
    "generate": (40, 120), "pretokenize": (30, 120),
}  # fmt: skip
SMOKE_TRAIN_LAYERS = (2, 1)  # the debug model's depth in --cpu-smoke, and its fallback
MIN_STEP_S = 5  # a step with less time than this left is not started
ECHO_CHARS = 4000  # of a setup step's output, printed to the console too


@dataclass
class Step:
    part: str
    name: str
    argv: list[str]  # "{json}" -> this step's scratch JSON, "{out}" -> the output folder, "{python}"
    budget_s: int
    result: str = ""  # where its JSON goes in summary["results"] ("a" or "a.b"); empty: none
    env: dict[str, str] = field(default_factory=dict)
    needs: str = ""  # an executable that must be on PATH; the step is skipped (not failed) without it
    echo: bool = False  # also print its output to the console (setup: versions, nvidia-smi)
    # filled when it runs
    command: str = ""
    status: str = "pending"  # ok | failed | timeout | skipped | not run
    rc: int | None = None
    seconds: float | None = None
    timeout_s: float | None = None
    note: str = ""


@dataclass
class Part:
    key: str
    title: str
    log: str
    steps: list[Step]
    # run instead of the remaining steps when a step fails other than by timeout (train: out of memory)
    fallback: list[Step] = field(default_factory=list)
    fallback_note: str = ""
    note: str = ""  # what happened to the part as a whole (a fallback, a timeout)
    budget_s: int = 0  # its primary steps' budgets (fallback steps run within it)

    def __post_init__(self):
        self.budget_s = sum(s.budget_s for s in self.steps)


def gpu_test_files() -> list[str]:
    """Test modules that hold `gpu`-marked tests (collecting only these saves importing the rest)."""
    files = sorted((REPO / "tests").glob("test_*.py"))
    return [str(f.relative_to(REPO)) for f in files if "mark.gpu" in f.read_text()]


def build_plan(smoke: bool, parts: list[str], train_layers: int = FULL_LAYERS) -> list[Part]:
    py = "{python}"
    common = {
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    if smoke:
        # CPU only, even where a GPU is visible; Triton kernels in the interpreter (set before torch loads).
        common.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")

    def step(part, name, argv, budget_key, result="", env=None, needs=""):
        budget = BUDGET_S[budget_key][1 if smoke else 0]
        return Step(part, name, argv, budget, result, {**common, **(env or {})}, needs, echo=part == "setup")

    plan = [
        Part("setup", "offline install, versions, nvidia-smi", "setup.log", [
            step("setup", "install", ["bash", "bench/gpu/install_offline.sh", *(["--dry-run"] if smoke else [])],
                 "install", env={"PYTHON": py}),
            step("setup", "env", [py, "bench/gpu/env_info.py", "--out", "{json}"], "env", "env"),
            step("setup", "nvidia-smi", ["nvidia-smi"], "nvidia-smi", needs="nvidia-smi"),
        ]),
    ]  # fmt: skip

    if "tests" in parts:
        pytest = [py, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-q", "-rA", "-p", "no:cacheprovider",
                  "--junitxml={out}/tests.xml", "-o", "junit_family=xunit1"]  # fmt: skip
        if not smoke:
            # Triton compiles a kernel per shape: spread the tests over processes (16 cores there)
            if importlib.util.find_spec("xdist"):
                pytest += ["-n", "8"]
            if importlib.util.find_spec("pytest_timeout"):
                pytest += ["--timeout", "60"]
        plan.append(Part("tests", "gpu-marked tests", "tests.log", [
            step("tests", "pytest -m gpu", pytest, "pytest", env={"OMP_NUM_THREADS": "2"}),
        ]))  # fmt: skip

    if "kernels" in parts:
        if smoke:
            align = ["--device", "cpu", "--rows-per-sample", "8", "--samples", "2", "--hidden", "32", "--dim", "16",
                     "--warmup", "0", "--iters", "1", "--compile-backend", "eager"]
            lm = ["--device", "cpu", "--rows", "64", "--hidden", "32", "--vocab", "256", "--warmup", "0", "--iters",
                  "1", "--compile-backend", "eager"]  # fmt: skip
        else:
            align, lm = [], []  # the scripts' defaults: the 7B shapes, CUDA, bf16
        plan.append(Part("kernels", "kernel benchmarks at the 7B shapes", "kernels.log", [
            step("kernels", "align_kernel", [py, "bench/align_kernel.py", *align, "--out", "{json}"],
                 "align_kernel", "align_kernel"),
            step("kernels", "lm_loss", [py, "bench/lm_loss.py", *lm, "--out", "{json}"],
                 "lm_loss", "lm_loss"),
        ]))  # fmt: skip

    if "train" in parts:

        def train_argv(layers: int, mode: str) -> list[str]:
            if smoke:
                size = ["--shape", "debug", "--layers", str(layers), "--seq-len", "128", "--steps", "1", "--warmup", "1",
                        "--code-side", "4", "--feature-dim", "16"]  # fmt: skip
            else:
                size = ["--shape", "chameleon7b", "--layers", str(layers), "--seq-len", "4096", "--steps", "4",
                        "--warmup", "2"]  # fmt: skip
            return [py, "bench/train_throughput.py", *size, "--micro-batch", "1", "--modes", mode,
                    "--ds_config", "bench/gpu/zero3_torch_adam.json", "--out", "{json}"]  # fmt: skip

        # expandable segments: less fragmentation with 7B of ZeRO-3 partitions on one GPU
        env = {} if smoke else {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        layers, fallback = SMOKE_TRAIN_LAYERS if smoke else (train_layers, FALLBACK_LAYERS)
        plan.append(Part(
            "train", f"{'debug' if smoke else 'Chameleon-7B'} training step, {layers} layers, ARRA on and off",
            "train.log",
            [step("train", f"arra {layers}L", train_argv(layers, "arra"), "train arra", "train.arra", env),
             step("train", f"ar {layers}L", train_argv(layers, "ar"), "train ar", "train.ar", env)],
            fallback=[step("train", f"arra {fallback}L", train_argv(fallback, "arra"), "fallback arra", "train.arra", env),
                      step("train", f"ar {fallback}L", train_argv(fallback, "ar"), "fallback ar", "train.ar", env)],
            fallback_note=f"{layers} layers failed (see train.log); measured at {fallback} layers instead",
        ))  # fmt: skip

    if "generate" in parts:
        if smoke:
            gen = ["--shape", "cpu-small", "--layers", "1", "--size", "64", "--num-images", "2", "--batch-size", "2",
                   "--baseline-images", "1", "--warmup-size", "32", "--device", "cpu", "--dtype", "fp32",
                   "--threads", "1"]
            pre = ["--size", "tiny", "--num-images", "8", "--batch-size", "4", "--num-workers", "0", "--repeats", "1",
                   "--warmup-images", "2", "--device", "cpu"]
        else:
            gen = ["--shape", "chameleon7b", "--layers", str(GENERATE_LAYERS), "--size", "512", "--num-images", "16",
                   "--batch-size", "16", "--baseline-images", "1", "--warmup-size", "64", "--device", "cuda",
                   "--dtype", "bf16"]
            pre = ["--size", "real", "--num-images", "128", "--batch-size", "32", "--num-workers", "8", "--repeats",
                   "2", "--warmup-images", "8", "--device", "cuda"]  # fmt: skip
        plan.append(Part("generate", "batched generation and pre-tokenization at 512 x 512", "generate.log", [
            step("generate", "generate", [py, "bench/generate.py", *gen, "--out", "{json}"], "generate", "generate"),
            step("generate", "pretokenize", [py, "bench/pretokenize.py", *pre, "--out", "{json}"], "pretokenize",
                 "pretokenize"),
        ]))  # fmt: skip
    return plan


def total_budget_s(plan: list[Part]) -> int:
    return sum(p.budget_s for p in plan)


def parse_junit(path: Path) -> dict:
    """pytest's JUnit XML -> {"counts": {outcome: n}, "cases": [{test, outcome, seconds, message}]}."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0][:200] if message else ""
                break
        module = case.get("classname", "").rsplit(".", 1)[-1] if "." in case.get("classname", "") else ""
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append({"test": name, "module": module, "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})  # fmt: skip
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return {"counts": counts, "cases": cases}


def cap_log(path: Path, cap: int = LOG_CAP_BYTES) -> None:
    """Keep a log under the device tool's file limit: its head and tail, with the cut said in between."""
    size = path.stat().st_size
    if size <= cap:
        return
    head, tail = cap * 3 // 4, cap // 4 - 200
    with open(path, "rb") as f:
        first = f.read(head)
        f.seek(size - tail)
        last = f.read()
    path.write_bytes(first + f"\n\n[... {size - head - tail} bytes cut by suite.py ...]\n\n".encode() + last)


def run_step(step: Step, argv: list[str], env: dict, log_path: Path, timeout_s: float) -> None:
    """Run one step with its output appended to the part's log; kill its process group at the timeout."""
    step.command = shlex.join(argv)
    step.timeout_s = round(timeout_s, 1)
    with open(log_path, "a") as log:
        log.write(f"\n===== {step.part} / {step.name}: {step.command}\n===== timeout {timeout_s:.0f} s, "
                  f"started {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")  # fmt: skip
        log.flush()
        start = time.monotonic()
        # own session: the timeout ends the step and every process it started (DataLoader and xdist workers)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            step.rc = proc.wait(timeout=timeout_s)
            step.status = "ok" if step.rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            step.rc, step.status = proc.returncode, "timeout"
        step.seconds = round(time.monotonic() - start, 1)
        log.write(f"\n===== {step.part} / {step.name}: {step.status} (rc {step.rc}) after {step.seconds} s\n")
    cap_log(log_path)


def put_result(results: dict, key: str, value) -> None:
    node = results
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


class Suite:
    def __init__(self, plan: list[Part], out: Path, smoke: bool, command: str, python: str):
        self.plan, self.out, self.smoke, self.python = plan, out, smoke, python
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.start = time.monotonic()
        self.deadline = self.start + total_budget_s(plan)
        self.summary = {
            "suite": "arra_ds GPU check (bench/gpu/run.sh, bench/gpu/suite.py)",
            "mode": "cpu-smoke" if smoke else "gpu",
            "command": command,
            "device_call": {"carry": DEVICE_CARRY, "command": DEVICE_COMMAND, "timeout_s": DEVICE_TIMEOUT_S},
            "commit": git_commit(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "wall_s": None,
            "budget_s": total_budget_s(plan),
            "parts": [],
            "results": {},
        }

    def write(self) -> None:
        self.summary["wall_s"] = round(time.monotonic() - self.start, 1)
        self.summary["parts"] = [
            {"key": p.key, "title": p.title, "log": p.log, "budget_s": p.budget_s,
             "steps": [{k: v for k, v in asdict(s).items() if k not in ("argv", "env")} for s in p.steps],
             "note": p.note}
            for p in self.plan
        ]  # fmt: skip
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1))
        os.replace(tmp, self.out / "summary.json")
        try:
            markdown = report.render_markdown(self.summary)
        except Exception as e:  # noqa: BLE001 - a report bug must not stop the measurements; summary.json has all
            markdown = f"report.py failed on this summary ({type(e).__name__}: {e}); rerun it on summary.json\n"
        tmp = self.out / ".RESULTS_gpu.md.tmp"
        tmp.write_text(markdown)
        os.replace(tmp, self.out / "RESULTS_gpu.md")

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        planned_end = self.start
        for part in self.plan:
            planned_end += part.budget_s
            print(f"[suite] part {part.key}: {part.title} (budget {part.budget_s} s)", flush=True)
            self.run_part(part, planned_end)
            self.collect_after(part)
            self.write()
        self.summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.write()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.summary

    def run_part(self, part: Part, planned_end: float) -> None:
        queue, done = list(part.steps), []
        while queue:
            step = queue.pop(0)
            done.append(step)
            # until the part's planned end less the budgets of the steps still queued, and never past the deadline
            timeout = min(planned_end - sum(s.budget_s for s in queue), self.deadline) - time.monotonic()
            if step.needs and not shutil.which(step.needs):
                step.status, step.note = "skipped", f"no {step.needs} on this machine"
            elif timeout < MIN_STEP_S:
                step.status, step.note = "not run", "no time left in the budget"
            else:
                self.run_one(part, step, len(done), timeout)
            self.write()
            if step.status in ("failed", "timeout") and part.fallback and step not in part.fallback:
                for rest in queue:
                    rest.status, rest.note = "not run", f"after {step.name} {step.status}"
                done.extend(queue)
                if step.status == "failed":  # out of memory, say: the smaller fallback still has time
                    queue, part.note = list(part.fallback), part.fallback_note
                    self.drop_results(part)
                else:  # a timeout leaves no time for anything else of this part
                    queue, part.note = [], f"{step.name} timed out; the rest of the part was not run"
        part.steps = done

    def run_one(self, part: Part, step: Step, index: int, timeout: float) -> None:
        json_path = self.scratch / f"{part.key}_{index}.json"
        argv = [a.replace("{python}", self.python).replace("{json}", str(json_path)).replace("{out}", str(self.out))
                for a in step.argv]  # fmt: skip
        env = {**os.environ, **{k: v.replace("{python}", self.python) for k, v in step.env.items()}}
        print(f"[suite]   {step.name}: up to {timeout:.0f} s", flush=True)
        log = self.out / part.log
        offset = log.stat().st_size if log.exists() else 0
        run_step(step, argv, env, log, timeout)
        if step.echo:
            with open(log, "rb") as f:
                f.seek(offset)
                print(f.read().decode(errors="replace")[-ECHO_CHARS:], flush=True)
        print(f"[suite]   {step.name}: {step.status} (rc {step.rc}) in {step.seconds} s", flush=True)
        if step.result and json_path.is_file():
            put_result(self.summary["results"], step.result, json.loads(json_path.read_text()))

    def drop_results(self, part: Part) -> None:
        """A fallback replaces the part's results: never mix figures of two layer counts."""
        if part.key == "train":
            self.summary["results"].pop("train", None)

    def collect_after(self, part: Part) -> None:
        results = self.summary["results"]
        if part.key == "tests":
            junit = self.out / "tests.xml"
            results["tests"] = parse_junit(junit) if junit.is_file() else {"counts": {}, "cases": [],
                                                                           "error": "no JUnit report"}
        if part.key == "train":
            train = results.get("train", {})
            modes = {m: train[m]["results"][0] for m in ("ar", "arra") if m in train and train[m].get("results")}
            if {"ar", "arra"} <= set(modes) and modes["ar"]["layers"] == modes["arra"]["layers"]:
                train["arra_over_ar_step_time"] = modes["arra"]["step_ms"] / modes["ar"]["step_ms"]
            train["note"] = part.note


def git_commit() -> str | None:
    """The checkout's commit, where the working tree has its .git (the device's copy may not)."""
    if not shutil.which("git"):
        return None
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("+local changes" if dirty else "")


def print_plan(plan: list[Part]) -> None:
    print(f"{'part':9} {'step':19} {'budget s':>8}  command")
    for part in plan:
        for s in part.steps + part.fallback:
            tag = " (fallback)" if s in part.fallback else ""
            shown = [a.replace("{python}", "python3").replace("{json}", "SCRATCH.json").replace("{out}", "OUT")
                     for a in s.argv]  # fmt: skip
            print(f"{part.key:9} {s.name + tag:19} {s.budget_s:8d}  {shlex.join(shown)}")
    print(f"{'total':29} {total_budget_s(plan):8d}  (fallback steps run within the train part's budget)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (the device's $OUT)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, Triton interpreter")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (setup always)")
    parser.add_argument("--train-layers", type=int, default=FULL_LAYERS, help="decoder layers of the training step")
    parser.add_argument("--plan", action="store_true", help="print the steps and budgets, run nothing")
    parser.add_argument("--command", default="", help="the command line to record (run.sh passes its own)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    plan = build_plan(args.cpu_smoke, parts, args.train_layers)
    if args.plan:
        print_plan(plan)
        return 0
    if not args.out:
        parser.error("--out DIR is needed (on the device: $OUT)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stray = [p.name for p in out.iterdir() if p.name not in OUT_FILES]
    if stray:
        print(f"[suite] note: {out} already holds {stray}; the device tool returns at most {MAX_OUT_FILES} files")
    suite = Suite(plan, out, args.cpu_smoke, args.command or shlex.join([sys.executable, *sys.argv]), sys.executable)
    summary = suite.run()
    print(report.render_short(summary), flush=True)
    failed = [s for p in summary["parts"] for s in p["steps"] if s["status"] in ("failed", "timeout")]
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
