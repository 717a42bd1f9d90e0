"""Crash, preemption, exact resume, over-long skipping under ZeRO-3, and export: real 2-rank CPU runs.

Four DeepSpeed launches are shared by all tests here (each costs ~20-60 s on a small CPU box):

    reference      uninterrupted, 10 steps
    crashed        the same run, every rank SIGKILLed in the middle of writing the step-6 checkpoint
    preempted      resume=auto of `crashed`; SIGTERM sent to rank 1 only, right after the resume
    finished       resume=auto of `preempted`, to the end

The data set has many over-long samples (``data.overlong=skip``), so micro-batches shrink, some are
empty on one rank while the other rank has samples, and some steps have no sample at all; attention
dropout is on, so the per-rank RNG states must be restored for the losses to match bitwise.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict

import numpy as np
import psutil
import pytest
import torch
import yaml
from conftest import REPO_ROOT, free_port, launcher, subprocess_env
from streaming import MDSWriter

from arra_ds import checkpoints
from arra_ds.data.schema import columns_for
from arra_ds.demo.config import DEMO_ENCODER, DemoDataConfig
from arra_ds.model.arra import AlignConfig
from arra_ds.tokens.layout import conversation_tokens, image_to_tokens
from arra_ds.tokens.vocab import ChameleonVocab, build_debug_tokenizer
from arra_ds.train import checkpoint as ckpt
from arra_ds.train.preemption import REQUEUE_EXIT_CODE
from arra_ds.train.sample_log import read_sample_logs

pytestmark = pytest.mark.slow

NUM_SAMPLES = 48  # 6 steps per epoch at 2 ranks x 4: 10 steps cover one full epoch and part of the next
MAX_STEPS = 10
MAX_SEQ_LEN = 128  # an 8x8-code demo sample has ~90 tokens, a 16x16 one ~290
TIMING_KEYS = {"tokens_per_s", "mfu"}
# lambda ramps up over 3 steps, decays (cosine) and stops at step 8: the crash (step 6) and the resumes fall inside it
ALIGN_SCHEDULE = ("align.schedule=cosine", "align.warmup_steps=3", "align.stop_step=8")


def _token_sample(index: int, code_size: int, vocab, tokenizer, rng, feature_dim: int) -> dict:
    """One sample with the real layout: a caption and a random code_size x code_size image."""
    caption = "a red square at the top left"
    prompt = tokenizer.encode(caption, add_special_tokens=False).ids
    codes = torch.from_numpy(rng.integers(0, vocab.num_image_codes, (code_size, code_size)))
    tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
    return {
        "tokens": np.asarray(tokens, dtype=np.int32),
        "prompt_len": np.int32(prompt_len),
        f"feat_{DEMO_ENCODER}": rng.standard_normal(feature_dim).astype(np.float16),
        "caption": caption,
        "uid": f"demo-{index:06d}",
    }


def _write_data(out):
    """NUM_SAMPLES samples; 7 in 10 (by index) have a 16x16 image and exceed MAX_SEQ_LEN."""
    tokenizer = build_debug_tokenizer(num_image_codes=256)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source="debug tokenizer")
    rng = np.random.default_rng(0)
    feature_dim = DemoDataConfig().feature_dim
    uids_overlong = set()
    with MDSWriter(out=str(out), columns=columns_for([DEMO_ENCODER]), size_limit=1 << 14, progress_bar=False) as w:
        for i in range(NUM_SAMPLES):
            code_size = 16 if i % 10 < 7 else 8
            sample = _token_sample(i, code_size, vocab, tokenizer, rng, feature_dim)
            assert (len(sample["tokens"]) > MAX_SEQ_LEN) == (code_size == 16)
            if code_size == 16:
                uids_overlong.add(sample["uid"])
            w.write(sample)
    return uids_overlong


def _command(run_dir, data_dir, *extra):
    return [
        launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        "launch/train.py", "--ds_config", "ds_configs/zero3.json", f"output_dir={run_dir}", f"data.path={data_dir}",
        f"data.max_seq_len={MAX_SEQ_LEN}", "data.overlong=skip", "train.micro_batch_size=4",
        f"train.max_steps={MAX_STEPS}", "train.save_every=2", "train.keep_last=2", "train.log_every=1",
        "train.log_samples=true", "train.progress_bar=false", "optim.warmup_steps=2", "model.attention_dropout=0.1",
        *ALIGN_SCHEDULE, *extra,
    ]


def _run(cmd, env=None):
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=900)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged_steps(path):
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _rank_pid(launcher_pid, local_rank):
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("skipdata") / "mds"
    return out, _write_data(out)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(_command(run_dir, data[0]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """The crashed -> preempted -> finished chain; returns what each stage left behind."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    seen = {}

    crashed = _run(_command(run_dir, data[0]), env=subprocess_env(**{ckpt.KILL_DURING_SAVE_ENV: "6"}))
    seen["crashed_rc"] = crashed.returncode
    seen["crashed_listing"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    seen["crashed_latest"] = checkpoints.read_latest(run_dir / "checkpoints")

    log_path = run_dir.parent / "preempted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(run_dir, data[0], "train.resume=auto"), cwd=REPO_ROOT,
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        signalled = False
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            # once the checkpoint is loaded (a collective: both ranks have their signal handlers)
            if not signalled and "resumed from" in log_path.read_text():
                os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: the ranks must agree
                signalled = True
            time.sleep(0.1)
        proc.wait(timeout=60)
    seen["preempted_rc"] = proc.returncode
    seen["preempted_log"] = log_path.read_text()
    seen["preempted_summary"] = json.loads((run_dir / "summary.json").read_text())
    seen["preempted_latest"] = checkpoints.read_latest(run_dir / "checkpoints")
    seen["preempted_steps"] = _logged_steps(run_dir / "metrics.jsonl")

    finished = _run(_command(run_dir, data[0], "train.resume=auto"))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    seen["finished_summary"] = json.loads((run_dir / "summary.json").read_text())
    return run_dir, seen


# ---- over-long samples under ZeRO-3 -------------------------------------------------------------


def test_overlong_samples_are_skipped_counted_and_ranks_stay_in_lockstep(reference, data):
    _, overlong = data
    logs = read_sample_logs(reference)
    assert sorted(logs) == [0, 1]
    by_micro = defaultdict(dict)  # (step, micro) -> rank -> line
    for rank, lines in logs.items():
        for line in lines:
            by_micro[(line["step"], line["micro"])][rank] = line
    assert len(by_micro) == MAX_STEPS and all(len(ranks) == 2 for ranks in by_micro.values())
    for ranks in by_micro.values():
        for line in ranks.values():
            assert len(line["uids"]) + len(line["skipped"]) == 4  # the stream advanced by a full micro-batch
            assert set(line["skipped"]) <= overlong and not set(line["uids"]) & overlong
    # the situations that need the filler batch: one rank empty while the other trains, and both empty
    one_empty = [k for k, r in by_micro.items() if (len(r[0]["uids"]) == 0) != (len(r[1]["uids"]) == 0)]
    assert one_empty, "the data/seed no longer produce an empty micro-batch on one rank; change the overlong pattern"

    rows = _metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    skipped_per_step = Counter()
    for (step, _), ranks in by_micro.items():
        skipped_per_step[step] += sum(len(line["skipped"]) for line in ranks.values())
    for row in rows:
        assert row["skipped_overlong"] == sum(skipped_per_step[s] for s in range(1, row["step"] + 1))
        assert row["truncated_overlong"] == 0
        kept = sum(len(line["uids"]) for (s, _), ranks in by_micro.items() if s == row["step"] for line in ranks.values())
        if kept:
            assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
        else:
            assert row["loss"] is None  # no sample in the whole step: nothing to average
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["skipped_overlong"] == rows[-1]["skipped_overlong"] > 0
    assert summary["samples_seen"] == MAX_STEPS * 8


# ---- crash during a save, preemption, exact resume ----------------------------------------------


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_as_latest(interrupted):
    _, seen = interrupted
    assert seen["crashed_rc"] != 0
    assert "step_00000006.partial" in seen["crashed_listing"]
    assert seen["crashed_latest"] == "step_00000004"
    assert "removed interrupted checkpoint saves ['step_00000006.partial']" in seen["preempted_log"]
    assert "resumed from" in seen["preempted_log"] and "at step 4 " in seen["preempted_log"]


def test_sigterm_on_one_rank_checkpoints_at_the_next_step_and_exits_for_requeue(interrupted):
    run_dir, seen = interrupted
    assert seen["preempted_rc"] == REQUEUE_EXIT_CODE, seen["preempted_log"][-3000:]
    summary = seen["preempted_summary"]
    assert summary["preempted"] is True and summary["resumed_from_step"] == 4
    stop = summary["steps"]
    assert 5 <= stop < MAX_STEPS  # the first step boundary after the signal
    assert seen["preempted_latest"] == checkpoints.tag_for(stop)  # the checkpoint is of the last step done
    assert seen["preempted_steps"][-1] == stop
    assert seen["preempted_log"].count("received SIGTERM") == 1  # only rank 1 got it ...
    assert "preempted by a signal on another rank" in seen["preempted_log"]  # ... and rank 0 followed
    assert seen["finished_summary"]["resumed_from_step"] == stop


def test_resumed_runs_reproduce_the_uninterrupted_run_bitwise(reference, interrupted):
    run_dir, _ = interrupted
    expected, got = _metrics(reference), _metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    for want, have in zip(expected, got):
        for key in want.keys() - TIMING_KEYS:
            assert have[key] == want[key], (want["step"], key, want[key], have[key])  # exact JSON floats
    # the logged lambda is the schedule's formula at every step, across the kill -9 and the preemption
    schedule = AlignConfig(**dict(key.removeprefix("align.").split("=") for key in ALIGN_SCHEDULE))
    schedule.warmup_steps, schedule.stop_step = int(schedule.warmup_steps), int(schedule.stop_step)
    assert [r["align_weight"] for r in got] == pytest.approx([schedule.align_weight_at(s, MAX_STEPS) for s in range(MAX_STEPS)])
    assert all(r["cos"] is None for r in got[8:]) and all(r["cos"] is not None for r in got[:8])


def test_every_sample_is_seen_exactly_once_per_epoch_across_the_interruptions(reference, interrupted):
    run_dir, _ = interrupted
    assert read_sample_logs(run_dir) == read_sample_logs(reference)
    steps_per_epoch = NUM_SAMPLES // 8
    for epoch, steps in enumerate((range(1, steps_per_epoch + 1), range(steps_per_epoch + 1, MAX_STEPS + 1))):
        consumed = [
            uid for lines in read_sample_logs(run_dir).values() for line in lines if line["step"] in steps
            for uid in line["uids"] + line["skipped"]
        ]
        assert len(consumed) == len(set(consumed)) == len(steps) * 8, epoch
    full_epoch = {uid for lines in read_sample_logs(run_dir).values() for line in lines
                  if line["step"] <= steps_per_epoch for uid in line["uids"] + line["skipped"]}
    assert full_epoch == {f"demo-{i:06d}" for i in range(NUM_SAMPLES)}


def test_checkpoints_are_complete_and_only_the_last_k_are_kept(interrupted):
    run_dir, _ = interrupted
    root = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.committed(root)] == ["step_00000008", "step_00000010"]
    assert checkpoints.read_latest(root) == "step_00000010"
    assert not list(root.glob("*.partial"))
    manifest = checkpoints.verify(root / "step_00000010")
    assert manifest["world_size"] == 2
    assert {"rng_rank_00000.pt", "rng_rank_00001.pt", checkpoints.TRAINER_STATE} <= set(manifest["files"])
    assert sum("optim_states" in name for name in manifest["files"]) == 2  # one ZeRO-3 partition per rank
    state = json.loads((root / "step_00000010" / checkpoints.TRAINER_STATE).read_text())
    assert state["step"] == MAX_STEPS and state["loader"]["sample_in_epoch"] > 0
    rng = torch.load(root / "step_00000010" / "rng_rank_00001.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8


# ---- unreadable checkpoints ----------------------------------------------------------------------


def _copy_latest(run_dir, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    tag = checkpoints.read_latest(run_dir / "checkpoints")
    shutil.copytree(run_dir / "checkpoints" / tag, root / tag)
    (root / checkpoints.LATEST).write_text(tag)
    return root / tag


def test_a_truncated_checkpoint_file_is_named(reference, tmp_path):
    copy = _copy_latest(reference, tmp_path)
    victim = copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(checkpoints.CheckpointError, match=f"{victim} is 100 bytes, but .* bytes were written"):
        checkpoints.verify(checkpoints.resolve_resume("auto", copy.parent))


def test_a_corrupt_checkpoint_file_of_the_right_size_is_named(reference, tmp_path):
    from arra_ds.checkpoints import consolidated_state_dict, resolve_checkpoint

    copy = _copy_latest(reference, tmp_path)
    victim = copy / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 256] = b"\xff" * 256
    victim.write_bytes(bytes(data))
    ref = resolve_checkpoint(copy)  # sizes still match the manifest
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint file {victim} is corrupt: its member .* fails the CRC"):
        consolidated_state_dict(ref)  # torch.load alone would read the damaged tensor without complaint
    # at resume each of the 2 ranks checks every 2nd torch file (sorted): the victim is rank 1's
    checkpoints.check_contents(copy, checkpoints.verify(copy), rank=0, world=2)
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint file {victim} is corrupt"):
        checkpoints.check_contents(copy, checkpoints.verify(copy), rank=1, world=2)


def test_a_checkpoint_without_manifest_is_refused(reference, tmp_path):
    copy = _copy_latest(reference, tmp_path)
    (copy / checkpoints.MANIFEST).unlink()
    with pytest.raises(checkpoints.CheckpointError, match="not a complete arra_ds checkpoint: manifest.json is missing"):
        checkpoints.verify(copy)


def test_a_full_disk_refuses_with_the_numbers(reference, monkeypatch):
    root = reference / "checkpoints"
    last = checkpoints.committed(root)[-1]
    size = sum(checkpoints.read_manifest(last)["files"].values())
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    with pytest.raises(checkpoints.CheckpointError, match=rf"needs about .* \({size:,} bytes, the size of the last checkpoint "
                       rf"{last.name}\); rank 0 sees .* \({size - 1:,} bytes\) free"):
        ckpt.ensure_disk_space(root, num_params=1)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=size))
    ckpt.ensure_disk_space(root, num_params=1)


# ---- export --------------------------------------------------------------------------------------


def test_export_loads_in_stock_transformers_with_the_trained_logits(reference, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    from arra_ds.checkpoints import consolidated_state_dict, resolve_checkpoint
    from arra_ds.model.arra import build_model
    from arra_ds.train.run_config import load_run_config

    out = tmp_path / "hf"
    proc = subprocess.run([launcher("python"), "launch/export_hf.py", str(reference), str(out), "--dtype", "fp32"],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "arra_export.json").read_text())
    assert info["step"] == MAX_STEPS and sorted(info["dropped"]) == [
        "align_head.fc1.bias", "align_head.fc1.weight", "align_head.fc2.bias", "align_head.fc2.weight"]

    exported, loading = ChameleonForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert not loading["missing_keys"]  # the debug model's tiny vqmodel is exported too: nothing initialised
    assert "vocabulary_map" in json.loads((out / "config.json").read_text())

    cfg = load_run_config(reference / "config.yaml")
    trained = build_model(cfg.model, cfg.align)
    trained.load_state_dict(consolidated_state_dict(resolve_checkpoint(reference)), strict=True)
    ids = torch.randint(0, exported.config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval().backbone.lm_head(trained.backbone.model(input_ids=ids).last_hidden_state)
        got = exported.eval().lm_head(exported.model(input_ids=ids).last_hidden_state)
        masked = exported(input_ids=ids).logits  # HF's forward masks the image-token logits
    assert torch.equal(got, want)
    text_ids = torch.ones(want.shape[-1], dtype=torch.bool)
    text_ids[trained.vocab.image_token_ids] = False
    assert torch.equal(masked[..., text_ids], want[..., text_ids])


def test_export_reads_only_the_model_section(reference, tmp_path):
    """A run copied to a machine without its training data still exports (data.path is not checked)."""
    run = tmp_path / "copied_run"
    shutil.copytree(reference, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = str(tmp_path / "not_mounted")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "hf"
    proc = subprocess.run([launcher("python"), "launch/export_hf.py", str(run), str(out), "--dtype", "fp32"],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "arra_export.json").read_text())["step"] == MAX_STEPS
