"""What every launcher does around its work: options in any order, user errors as one line, bugs with a traceback."""

import socket
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, subprocess_env

from arra_ds.cli import BAD_INPUT_EXIT_CODE, launcher_parser, parse_args, run_launcher
from arra_ds.errors import ConfigError, UserError
from arra_ds.generate.pipeline import GenerateConfig


def test_a_user_error_is_one_line_and_exit_2(capsys):
    def work():
        raise ConfigError("align.layer=9 is out of range: use 1..4")

    assert run_launcher(work) == BAD_INPUT_EXIT_CODE
    err = capsys.readouterr().err
    assert err == "error: align.layer=9 is out of range: use 1..4\n"


def test_a_user_error_may_carry_its_own_exit_code(capsys):
    class Diverged(UserError):
        exit_code = 3

    assert run_launcher(lambda: (_ for _ in ()).throw(Diverged("loss is NaN"))) == 3
    assert capsys.readouterr().err == "error: loss is NaN\n"


def test_an_internal_error_keeps_its_traceback():
    def work():
        raise ValueError("an internal inconsistency, not the user's input")

    with pytest.raises(ValueError, match="internal inconsistency"):
        run_launcher(work)


def test_the_work_result_is_the_exit_code():
    assert run_launcher(lambda: 75) == 75
    assert run_launcher(lambda: {"done": True}) == 0


def test_options_and_overrides_in_any_order():
    parser = launcher_parser("test", GenerateConfig)
    parser.add_argument("--prompt", action="append", default=[])
    args = parse_args(parser, ["model=runs/x", "--prompt", "a red circle", "output_dir=out", "--config", "c.yaml",
                               "sampling.seed=3"])
    assert args.prompt == ["a red circle"] and args.config == "c.yaml"
    assert args.overrides == ["model=runs/x", "output_dir=out", "sampling.seed=3"]


def test_help_lists_the_config_keys():
    text = launcher_parser("test", GenerateConfig).format_help()
    assert "sampling.guidance_scale=None (float | None)" in text and "samples_per_prompt=1 (int)" in text


@pytest.mark.parametrize("script, args, where", [
    ("launch/generate.py", ["--prompt", "a red circle", "sampling.guidance=3", "model=nowhere"], "sampling.guidance"),
    ("launch/pretokenize.py", ["input=nowhere.json", "out_dir=out"], "input="),
    ("launch/train.py", ["align.layr=2"], "align.layr"),
    ("launch/pretokenize_imagefolder.py", ["input=nowhere", "out_dir=out"], "input="),
    ("launch/eval.py", ["model=runs/nonexistent", "sampling.guidance_scale=0.5"], "no such run directory"),
    ("launch/generate.py", ["model=runs/nonexistent", "--prompt", "a red circle"], "no such run directory"),
    ("launch/export_hf.py", ["runs/nonexistent", "out"], "no such run directory"),
])
def test_launchers_print_a_user_error_as_one_line(script, args, where, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == BAD_INPUT_EXIT_CODE, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and where in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_without_a_launcher_runs_as_one_rank(tmp_path):
    """python launch/train.py (no deepspeed / torchrun): a process group of one on a free port."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--ds_config", "ds_configs/zero3.json",
         f"output_dir={run}", "train.max_steps=2", "demo.num_samples=32", "demo.num_heldout=4", "train.progress_bar=false"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 2/2 steps" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (run / "samples.png").is_file()  # the in-training grid also runs at the last step


@pytest.mark.slow
def test_a_taken_port_is_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "launch" / "train.py"), f"output_dir={tmp_path}"],
            cwd=REPO_ROOT, env=subprocess_env(MASTER_PORT=port), capture_output=True, text=True, timeout=600,
        )
    assert proc.returncode == BAD_INPUT_EXIT_CODE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--master_port" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
