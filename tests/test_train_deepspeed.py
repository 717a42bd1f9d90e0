"""Real multi-rank DeepSpeed ZeRO-3 runs on CPU (gloo), launched exactly as the README does."""

import json
import subprocess

import pytest
from conftest import REPO_ROOT, free_port, launcher, subprocess_env

pytestmark = pytest.mark.slow

# Small and quick: 128 demo samples, micro-batch 4.
BASE = [
    "train.progress_bar=false",
    "train.log_every=1",
    "demo.num_samples=128",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
    "model.activation_checkpointing=true",
]



def run_deepspeed(num_ranks: int, run_dir, *overrides, ds_config="ds_configs/zero3.json", check=True):
    cmd = [
        launcher("deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
        "launch/train.py", "--ds_config", ds_config, f"output_dir={run_dir}", *BASE, *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_ranks_learn_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    run_deepspeed(2, run, "train.max_steps=16", "train.save_every=8")
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 0.3, (first, last)
    assert last["samples_seen"] == 16 * 4 * 2
    assert all(r["grad_norm"] > 0 for r in rows)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000016"
    # ZeRO-3: every rank wrote its own optimizer/parameter partition
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000008").iterdir())
    assert sum("optim_states" in s for s in shards) == 2, shards
    assert (run / "config.yaml").is_file() and (run / "ds_config.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    proc = run_deepspeed(2, run, "train.max_steps=20", "train.save_every=8", "train.resume=auto")
    assert "resumed from" in proc.stdout and "at step 16" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 16
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["samples_seen"] == 20 * 4 * 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """Same global batch (8) as 1 rank x 2 accumulation steps and 2 ranks x 1: the same samples form
    each optimizer step, so the losses agree up to fp32 summation order. With patch targets
    (align.feature=patch: the demo's patch features, one target per aligned position), which take the
    global path's every distributed step and add the per-sample code grids. The length is train.epochs:
    0.375 x (128 samples // global batch 8) = 6 steps, on 1 rank and on 2."""
    common = ["train.max_steps=0", "train.epochs=0.375", "train.global_batch_size=8", "train.save_every=100",
              "align.feature=patch"]
    run_deepspeed(1, tmp_path / "one", *common)
    run_deepspeed(2, tmp_path / "two", *common)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in ("loss", "loss_ar", "loss_gva", "cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


def test_non_finite_loss_stops_with_the_step_named(tmp_path):
    proc = run_deepspeed(1, tmp_path / "nan", "train.max_steps=5", "optim.lr=1e30", "optim.warmup_steps=0", check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step" in proc.stderr + proc.stdout


def test_residual_dropout_under_zero3_replays_its_masks_in_checkpointed_recompute(tmp_path):
    """Residual dropout (forward hooks) under ZeRO-3's own module hooks: with activation checkpointing
    the recompute in backward must use the forward's masks, so the run equals the one without
    checkpointing. The recipes' other keys ride along: warm-up in epochs, weight decay on every parameter."""
    common = ["train.max_steps=5", "train.save_every=100", "model.residual_dropout=0.1", "optim.decay_params=all",
              "optim.warmup_steps=0", "optim.warmup_epochs=0.25", "optim.schedule=constant"]  # fmt: skip
    proc = run_deepspeed(2, tmp_path / "ckpt", *common)
    assert "optim.warmup_epochs=0.25: 4 warm-up steps (128 samples / global batch 8 = 16 steps per epoch)" in proc.stdout
    run_deepspeed(2, tmp_path / "plain", *common, "model.activation_checkpointing=false")
    ckpt, plain = metrics(tmp_path / "ckpt"), metrics(tmp_path / "plain")
    assert [r["lr"] for r in ckpt] == pytest.approx([r["lr"] for r in plain])
    assert ckpt[3]["lr"] == pytest.approx(ckpt[4]["lr"]) and ckpt[2]["lr"] < ckpt[3]["lr"]  # 4 warm-up steps
    for a, b in zip(ckpt, plain):
        for key in ("loss", "loss_ar", "loss_gva", "cos", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
    run_deepspeed(2, tmp_path / "off", *common, "model.residual_dropout=0", "train.max_steps=1")
    assert metrics(tmp_path / "off")[0]["loss"] != pytest.approx(ckpt[0]["loss"], rel=1e-4)  # the hooks fired under ZeRO-3
