"""The one-call GPU check (bench/gpu/run.sh -> suite.py -> report.py): its plan fits the device call, its
timeouts / fallback / budget roll-over work, its reports say what ran, and the whole suite runs on the CPU
at tiny sizes (`--cpu-smoke`), so the device's time is not spent finding a broken script."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import harness
from bench.gpu import suite

report = suite.report  # the module the suite renders with

REPO = Path(__file__).resolve().parents[1]
DEVICE_FILE_LIMIT = 16 * 2**20  # the device tool returns files of at most 16 MiB


def test_gpu_plan_fits_one_device_call():
    plan = suite.build_plan(smoke=False, parts=list(suite.PARTS))
    assert [p.key for p in plan] == ["setup", "tests", "kernels", "train", "generate"]  # most valuable first
    total = suite.total_budget_s(plan)
    assert total <= 8 * 60  # well under the 9 minutes the issue allows, the install included
    assert total + 30 <= suite.DEVICE_TIMEOUT_S <= 9 * 60
    train = next(p for p in plan if p.key == "train")
    assert sum(s.budget_s for s in train.fallback) <= train.budget_s
    first = " ".join(train.steps[0].argv)
    for flag in ("--shape chameleon7b", f"--layers {suite.FULL_LAYERS}", "--seq-len 4096", "--modes arra"):
        assert flag in first
    assert "--modes ar " in " ".join(train.steps[1].argv) + " "
    written = {p.log for p in plan} | {"summary.json", "RESULTS_gpu.md", "tests.xml"}
    assert written == set(suite.OUT_FILES) and len(suite.OUT_FILES) <= suite.MAX_OUT_FILES
    # the tests step collects every module that holds gpu-marked tests
    pytest_argv = next(p for p in plan if p.key == "tests").steps[0].argv
    assert {"tests/test_kernels.py", "tests/test_gpu_paths.py"} <= set(pytest_argv)


def test_readme_gives_the_device_command():
    readme = (REPO / "README.md").read_text()
    for text in (suite.DEVICE_COMMAND, f"timeout_s={suite.DEVICE_TIMEOUT_S}", json.dumps(suite.DEVICE_CARRY)):
        assert text in readme


def _python_step(part, name, code, budget, result=""):
    """A step running ``code`` (sys.argv[1] is its scratch JSON path)."""
    return suite.Step(part, name, ["{python}", "-c", code, "{json}"], budget, result)


def _train_json(mode, step_ms):
    row = dict(mode=mode, layers=1, step_ms=step_ms, tokens_per_s_per_rank=1.0, forward_ms=1.0, backward_ms=1.0,
               optimizer_ms=1.0, peak_mem_gib=None, mfu=None, hfu=None, peak_flops=None)
    args = dict(shape="debug", layers=1, seq_len=8, micro_batch=1, ds_config="x.json", steps=1, warmup=0)
    code = f"import json, sys; json.dump({{'args': {args!r}, 'device': 'CPU', 'results': [{row!r}]}}, open(sys.argv[1], 'w'))"
    return code


def test_timeout_fallback_and_unused_time_passing_on(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "MIN_STEP_S", 0.5)
    sleeper = _python_step("kernels", "sleeper", "import time; time.sleep(120)", 2)
    quick = _python_step("kernels", "quick", "import json, sys; json.dump({'rows': []}, open(sys.argv[1], 'w'))", 10,
                         "align_kernel")
    crash = _python_step("train", "big arra", "raise SystemExit(3)", 10, "train.arra")
    never = _python_step("train", "big ar", "raise SystemExit(0)", 10, "train.ar")
    small = [_python_step("train", "small arra", _train_json("arra", 3.0), 10, "train.arra"),
             _python_step("train", "small ar", _train_json("ar", 2.0), 10, "train.ar")]
    plan = [suite.Part("kernels", "k", "kernels.log", [sleeper, quick]),
            suite.Part("train", "t", "train.log", [crash, never], fallback=small, fallback_note="fell back")]
    start = time.monotonic()
    summary = suite.Suite(plan, tmp_path, smoke=True, command="test", python=sys.executable).run()
    assert time.monotonic() - start < 20 + 15  # the budgets plus the sleeper's kill grace

    steps = {s["name"]: s for p in summary["parts"] for s in p["steps"]}
    assert steps["sleeper"]["status"] == "timeout" and steps["sleeper"]["seconds"] < 2 + 12
    assert steps["quick"]["status"] == "ok"
    assert steps["quick"]["timeout_s"] >= 9  # the sleeper could not eat the next step's own budget
    assert steps["big arra"]["status"] == "failed" and steps["big arra"]["rc"] == 3
    assert steps["big ar"]["status"] == "not run"
    assert steps["small arra"]["status"] == steps["small ar"]["status"] == "ok"
    # time the crash left unused passes on to the fallback
    assert steps["small arra"]["timeout_s"] > 10
    train = summary["results"]["train"]
    assert train["arra_over_ar_step_time"] == pytest.approx(1.5) and train["note"] == "fell back"
    assert summary["results"]["align_kernel"] == {"rows": []}
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["train"]["note"] == "fell back"
    assert "big arra" in (tmp_path / "train.log").read_text()
    assert "fell back" in (tmp_path / "RESULTS_gpu.md").read_text()


def test_junit_outcomes_become_the_tests_table(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_kernels" name="test_a[cuda]" time="1.5"/>'
        '<testcase classname="tests.test_kernels" name="test_b[cuda]" time="0.2">'
        '<failure message="AssertionError: 0.3 &gt; 0.01">long trace</failure></testcase>'
        '<testcase classname="tests.test_gpu_paths" name="test_c" time="0.1"><error message="OOM"/></testcase>'
        '<testcase classname="tests.test_gpu_paths" name="test_d" time="0"><skipped message="needs a CUDA device"/>'
        "</testcase></testsuite></testsuites>"
    )
    tests = suite.parse_junit(tmp_path / "t.xml")
    assert tests["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    markdown = report.render_markdown({"mode": "gpu", "results": {"tests": tests}, "parts": []})
    assert "| tests.test_kernels::test_b[cuda] | failed | 0.2 | AssertionError: 0.3 > 0.01 |" in markdown
    assert "| test_kernels | 1 | 1 | 0 | 0 |" in markdown
    assert "Skip reasons: needs a CUDA device." in markdown


def test_a_failing_kernel_implementation_costs_only_its_row(capsys):
    weight = torch.randn(3, requires_grad=True)

    def run_once(fn):
        weight.grad = None
        loss = fn(weight)
        loss.backward()
        return loss.detach(), [weight.grad]

    def broken(w):
        raise RuntimeError("Triton compile error\nsecond line")

    impls = {"eager": (lambda w: (w * w).sum(), "x^2"), "broken": (broken, ""), "same": (lambda w: w.square().sum(), "")}
    rows = harness.compare_implementations(impls, list(impls), run_once, ["loss", "d w"], torch.device("cpu"), 0, 1)
    assert [r.error for r in rows] == ["", "RuntimeError: Triton compile error", ""]
    assert rows[1].ms is None and rows[2].ms is not None and rows[2].rel_errors == {"loss": 0.0, "d w": 0.0}
    harness.print_table("t", rows)
    assert "| broken | failed | - | - | - | RuntimeError: Triton compile error |" in capsys.readouterr().out


def _gpu_summary() -> dict:
    """A summary as an H200 run would write it (figures invented for the test)."""
    env = {"device": "NVIDIA H200", "cuda_available": True, "multiprocessors": 132, "memory_gib": 139.8,
           "capability": "9.0", "driver": "580.159.04", "bf16_matmul_8192_tflops": 790.0, "copy_tb_per_s": 4.3,
           "python": "3.12.3", "torch_cuda": "13.0", "versions": {"torch": "2.11.0", "triton": "3.6.0"}}

    def kernel_rows(names, ms, peak):
        return [{"name": n, "ms": t, "peak_bytes": p, "note": "", "rel_errors": {"loss": 0.0}, "error": ""}
                for n, t, p in zip(names, ms, peak)]

    align = {"config": dict(kind="cosine", rows=8192, samples=8, hidden=4096, dim=512, dtype="bf16", device="cuda",
                            warmup=3, iters=10),
             "rows": kernel_rows(["eager", "compile", "fused"], [2.0, 1.5, 1.0], [400e6, 300e6, 100e6])}
    lm = {"config": dict(rows=32768, hidden=4096, vocab=65536, z_loss_weight=1e-5, chunk_size=2048, dtype="bf16",
                         device="cuda", warmup=2, iters=5),
          "rows": kernel_rows(["eager", "fused"], [100.0, 90.0], [20e9, 1e9])}
    lm["rows"].append({"name": "liger", "ms": None, "peak_bytes": None, "note": "", "rel_errors": {},
                       "error": "RuntimeError: boom"})

    def train_run(mode, step_ms, mfu):
        args = dict(shape="chameleon7b", layers=32, seq_len=4096, micro_batch=1, ds_config="bench/gpu/zero3_torch_adam.json",
                    steps=4, warmup=2)
        row = dict(mode=mode, layers=32, step_ms=step_ms, tokens_per_s_per_rank=4096 / step_ms * 1e3, forward_ms=1.0,
                   backward_ms=2.0, optimizer_ms=0.5, peak_mem_gib=120.0, mfu=mfu, hfu=mfu * 1.3, peak_flops=989e12,
                   planned_peak_gib=114.0, planned_parts_gib={"parameters": 13.0, "activations": 2.0})
        return {"args": args, "device": "NVIDIA H200", "results": [row]}

    results = {
        "env": env, "align_kernel": align, "lm_loss": lm,
        "train": {"arra": train_run("arra", 1010.0, 0.47), "ar": train_run("ar", 1000.0, 0.475),
                  "arra_over_ar_step_time": 1.01, "note": ""},
        "generate": dict(shape="chameleon7b", layers=16, hidden=4096, vocab=65536, size=512, tokens_per_image=1060,
                         dtype="bf16", guidance=4.0, num_images=16, batch_size=16, batched_images_per_s=1.2,
                         baseline_images=1, one_at_a_time_images_per_s=0.05, speedup=24.0, identical_images=1),
        "pretokenize": dict(size="real", encoders=["clip"], device="NVIDIA H200", num_images=256, batch_size=32,
                            num_workers=8, ours_images_per_s=200.0, reference_images_per_s=40.0, speedup_median=5.0,
                            speedup_per_repeat=[5.0, 5.1]),
    }  # fmt: skip
    return {"mode": "gpu", "command": suite.DEVICE_COMMAND, "started": "2026-12-01T10:00:00+00:00", "wall_s": 400,
            "budget_s": 455, "device_call": {"carry": [".gpu_wheels"], "timeout_s": suite.DEVICE_TIMEOUT_S},
            "parts": [{"key": "train", "steps": [{"name": "arra 32L", "status": "ok", "seconds": 60.0,
                                                  "timeout_s": 85, "note": ""}], "note": ""}],
            "results": results}  # fmt: skip


def test_report_states_figures_and_goals(tmp_path, capsys):
    summary = _gpu_summary()
    markdown = report.render_markdown(summary)
    assert "## GPU run: NVIDIA H200, 2026-12-01" in markdown
    assert "bf16 matmul 8192^3 790 TFLOP/s" in markdown
    assert 'carry=[".gpu_wheels"], timeout_s=' in markdown
    assert "Goal (fused faster than eager and torch.compile, with less memory): **met**" in markdown
    assert "20.0x less memory, 0.90x its time: **met**" in markdown
    assert "| liger | failed | - | - | - | - | RuntimeError: boom |" in markdown
    assert "Goal MFU >= 45% (ARRA on): 47.0%: **met**" in markdown
    assert "costs 1.00% of the step (goal < 2%): **met**" in markdown
    assert "| 32 | 4055 | 1010.0 |" in markdown  # tokens/s and step time of the ARRA row
    assert "| 120.0 | 114.0 |" in markdown and "(planned / measured 0.95)" in markdown  # plan vs measured peak
    assert "**24.0x**" in markdown and "**5.0x**" in markdown
    short = report.render_short(summary)
    assert "train arra 32L: 4055 tok/s" in short and "ARRA / AR step time: 1.0100" in short

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    report.main([str(path)])
    assert capsys.readouterr().out == markdown


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    """`run.sh --cpu-smoke` runs every step of the device suite at tiny sizes (install as a dry run)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--cpu-smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for p in summary["parts"] for s in p["steps"]}
    expected = ["install", "env", "pytest -m gpu", "align_kernel", "lm_loss", "arra 2L", "ar 2L", "generate",
                "pretokenize"]  # fmt: skip
    assert all(statuses[name] == "ok" for name in expected), statuses
    assert statuses["nvidia-smi"] in ("ok", "skipped")
    results = summary["results"]
    assert results["tests"]["counts"].get("skipped", 0) >= 30  # the gpu tests, collected and skipped on CPU
    lm_rows = [r["name"] for r in results["lm_loss"]["rows"] if r["ms"] is not None]
    assert lm_rows == ["eager", "compile", "chunked", "fused", "liger"]
    assert [r["name"] for r in results["align_kernel"]["rows"] if r["ms"] is not None] == ["eager", "compile", "fused"]
    assert results["train"]["arra_over_ar_step_time"] > 0
    assert results["train"]["arra"]["results"][0]["planned_peak_gib"] > 0  # the memory plan of the same setting
    assert results["generate"]["speedup"] > 0 and results["pretokenize"]["speedup_median"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(suite.OUT_FILES)
    assert all((out / f).stat().st_size <= DEVICE_FILE_LIMIT for f in files)
    markdown = (out / "RESULTS_gpu.md").read_text()
    for title in ("### 1.", "### 2.", "### 3.", "### 4."):
        assert title in markdown
    assert markdown == report.render_markdown(summary)
    assert "== arra_ds GPU check (cpu-smoke)" in proc.stdout
