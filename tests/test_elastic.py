"""Elastic resume: a ZeRO-3 run continued on another number of ranks.

The pieces in one process first (conversion cache protocol, global batch, canonical nodes, sample
logs), then real runs (slow; deepspeed / gloo on CPU): tiny debug model, 32 demo samples, a fixed global batch of 8 (4 steps per epoch), 6 steps, a
checkpoint after every step, no dropout. The launches, shared by all tests here:

    reference   1 rank, uninterrupted
    shrunk      2 ranks, every rank SIGKILLed while saving step 4 (latest: step 3); resumed on 1 rank
                with rank 0 SIGKILLed in the middle of the universal conversion; resumed on 1 rank again,
                to the end
    grown       the reference cut back to its step-3 checkpoint (what a run stopped there leaves),
                resumed on 2 ranks

2 ranks x 1 micro-batch and 1 rank x 2 accumulated micro-batches sum the same per-sample gradients
in another order, so the resumed runs match the reference up to fp32 reduction order: the bounds are
LOSS_RTOL and STATE_TOL. Measured (2 CPU cores, torch 2.14): losses within 1.2e-7 relative; after
the first resumed step, weights within 9.2e-7 (2 -> 1, three steps of drift) and 1.4e-8 (1 -> 2) and
Adam's moments within 2.8e-7 of their largest value.
"""

import hashlib
import json
import shutil
import subprocess
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import REPO_ROOT, free_port, launcher, subprocess_env

from arra_ds import checkpoints
from arra_ds.data.loader import DataConfig, resolve_canonical_nodes
from arra_ds.errors import ConfigError
from arra_ds.train import checkpoint as ckpt
from arra_ds.train.engine import DSConfigError, convert_to_universal, fill_ds_config
from arra_ds.train.optim import OptimConfig
from arra_ds.train.run_config import TrainConfig
from arra_ds.train.sample_log import SampleLog, read_sample_logs

NUM_SAMPLES = 32
GLOBAL_BATCH = 8
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH
MAX_STEPS = 6  # the resumed part crosses an epoch boundary
RESUME_STEP = 3
WEIGHT_DECAY = 0.05
LOSS_RTOL = 1e-5  # losses, relative
# max |resumed - reference| over all parameters <= STATE_TOL x max |reference|, per state
STATE_TOL = {"fp32": 1e-5, "exp_avg": 1e-5, "exp_avg_sq": 1e-5}
LOSS_KEYS = ("loss", "loss_ar", "loss_gva", "loss_z", "cos")


def _command(ranks, run_dir, *extra):
    if ranks == 1:  # a group of one without a launcher, as a single-GPU job runs
        start = [launcher("python"), "launch/train.py"]
    else:
        start = [launcher("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py"]
    return [
        *start, "--ds_config", "ds_configs/zero3.json", f"output_dir={run_dir}", f"demo.num_samples={NUM_SAMPLES}",
        "train.micro_batch_size=4", f"train.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={MAX_STEPS}",
        "train.save_every=1", "train.keep_last=0", "train.log_every=1", "train.log_samples=true",
        "train.progress_bar=false", "optim.warmup_steps=2", f"optim.weight_decay={WEIGHT_DECAY}", *extra,
    ]


def _run(ranks, run_dir, *extra, env=None):
    return subprocess.run(_command(ranks, run_dir, *extra), cwd=REPO_ROOT, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=900)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _hashes(ckpt_dir):
    """sha256 of every file the checkpoint's manifest lists."""
    files = checkpoints.read_manifest(ckpt_dir)["files"]
    return {rel: hashlib.sha256((ckpt_dir / rel).read_bytes()).hexdigest() for rel in files}


def _tag_dir(run_dir, step):
    return run_dir / checkpoints.CHECKPOINTS_DIR / checkpoints.tag_for(step)



# ---- in one process ------------------------------------------------------------------------------


class ConvertingEngine:
    """Saves one file per checkpoint like DeepSpeed's ``save_checkpoint(root, tag)``; its universal form
    is one file too. Counts conversions and records how each load was made."""

    def __init__(self, value=0, fail=False):
        self.value, self.fail = value, fail
        self.conversions, self.loads = 0, []

    def save(self, root, tag):
        torch.save({"value": torch.tensor(self.value)}, root / tag / "model_states.pt")

    def to_universal(self, checkpoint_dir, output_dir):
        if self.fail:
            raise RuntimeError("converter broke")
        self.conversions += 1
        converted = output_dir / checkpoint_dir.name
        converted.mkdir()
        shutil.copy(checkpoint_dir / "model_states.pt", converted / "model_states.pt")
        return converted

    def load(self, root, tag, universal=False):
        self.loads.append((root, tag, universal))
        self.value = int(torch.load(root / tag / "model_states.pt", weights_only=True)["value"])


def _checkpoint_of(tmp_path, world_size, step=2, value=7):
    """A committed checkpoint as ``world_size`` ranks would have written it (manifest says so)."""
    root = tmp_path / checkpoints.CHECKPOINTS_DIR
    state = ckpt.TrainerState(step=step, samples_seen=8 * step, world_size=world_size, global_batch_size=8)
    path = ckpt.save_checkpoint(ConvertingEngine(value), root, state, keep_last=0)
    return path


def test_a_checkpoint_of_another_world_size_is_converted_once_and_loaded_universal(tmp_path):
    path = _checkpoint_of(tmp_path, world_size=2)
    before = _hashes(path)
    engine = ConvertingEngine()
    state = ckpt.load_checkpoint(engine, path)
    universal = path / checkpoints.UNIVERSAL_DIR
    assert engine.value == 7 and engine.loads == [(universal, path.name, True)] and engine.conversions == 1
    assert state.step == 2 and state.world_size == 2 and state.global_batch_size == 8
    manifest = checkpoints.verify(universal)
    assert manifest["world_size"] == 2 and manifest["step"] == 2 and f"{path.name}/model_states.pt" in manifest["files"]
    assert _hashes(path) == before  # the checkpoint itself is untouched
    ckpt.load_checkpoint(engine, path)  # the cached form is used
    assert engine.conversions == 1 and engine.loads[-1] == (universal, path.name, True)
    assert checkpoints.verify(path)["files"] == checkpoints.read_manifest(path)["files"]


def test_the_same_world_size_loads_the_checkpoint_itself(tmp_path):
    path = _checkpoint_of(tmp_path, world_size=1)
    engine = ConvertingEngine()
    ckpt.load_checkpoint(engine, path)
    assert engine.loads == [(path.parent, path.name, False)] and engine.conversions == 0
    assert not (path / checkpoints.UNIVERSAL_DIR).exists()


def test_an_interrupted_or_damaged_conversion_is_redone(tmp_path):
    path = _checkpoint_of(tmp_path, world_size=2)
    partial = path / "universal.partial"
    partial.mkdir()
    (partial / "half_written.pt").write_bytes(b"x")
    # at start, rank 0 removes it with the interrupted saves
    assert ckpt.clean_interrupted(path.parent) == [f"{path.name}/universal.partial"] and not partial.exists()
    partial.mkdir()  # or the conversion itself starts over
    engine = ConvertingEngine()
    ckpt.load_checkpoint(engine, path)
    assert engine.conversions == 1 and not partial.exists()
    # a cache file damaged later: the cache fails its manifest and is rebuilt from the checkpoint
    universal = path / checkpoints.UNIVERSAL_DIR
    (universal / path.name / "model_states.pt").write_bytes(b"short")
    ckpt.load_checkpoint(engine, path)
    assert engine.conversions == 2 and engine.value == 7


def test_a_failing_conversion_names_the_checkpoint_and_leaves_no_cache(tmp_path):
    path = _checkpoint_of(tmp_path, world_size=2)
    before = _hashes(path)
    with pytest.raises(checkpoints.CheckpointError, match=rf"cannot convert checkpoint {path} \(2 ranks\) to DeepSpeed's "
                       r"universal form for 1 ranks: RuntimeError: converter broke"):
        ckpt.load_checkpoint(ConvertingEngine(fail=True), path)
    assert not (path / checkpoints.UNIVERSAL_DIR).exists() and not (path / "universal.partial").exists()
    assert _hashes(path) == before


def test_the_conversion_refuses_without_disk_space(tmp_path, monkeypatch):
    path = _checkpoint_of(tmp_path, world_size=2)
    size = sum(checkpoints.read_manifest(path)["files"].values())
    usage = shutil.disk_usage(path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda where: usage._replace(free=size))
    with pytest.raises(checkpoints.CheckpointError, match=rf"needs about .*\({2 * size:,} bytes, 2x the checkpoint\).* "
                       r"or resume with 2 ranks"):
        ckpt.load_checkpoint(ConvertingEngine(), path)


def test_a_resumed_run_keeps_the_checkpoints_global_batch():
    resumed = ckpt.TrainerState(step=10, samples_seen=640, world_size=8, global_batch_size=64)
    train = TrainConfig(micro_batch_size=8)
    global_batch = ckpt.resolve_global_batch(train, resumed, world=4)  # the job came back on half the nodes
    assert global_batch == 64 and replace(train, global_batch_size=global_batch).grad_accum_steps(4) == 2
    fresh = TrainConfig(micro_batch_size=8)
    assert ckpt.resolve_global_batch(fresh, None, world=4) == 32  # recorded: micro batch x ranks of the first start
    explicit = TrainConfig(micro_batch_size=8, global_batch_size=128)
    assert ckpt.resolve_global_batch(explicit, resumed, world=4) == 128
    assert train.global_batch_size == 0 and fresh.global_batch_size == 0  # the given configs are not changed
    with pytest.raises(checkpoints.CheckpointError, match=r"global batch of 64 samples.*16 ranks x "
                       r"train.micro_batch_size=8 = 128 samples per micro-step"):
        ckpt.resolve_global_batch(TrainConfig(micro_batch_size=8), resumed, world=16)


def test_checkpoints_without_a_recorded_global_batch_derive_it(tmp_path):
    path = _checkpoint_of(tmp_path, world_size=1, step=3)
    state = json.loads((path / checkpoints.TRAINER_STATE).read_text())
    del state["global_batch_size"]
    (path / checkpoints.TRAINER_STATE).write_text(json.dumps(state))
    assert ckpt.read_trainer_state(path).global_batch_size == 8


def test_the_canonical_node_count_comes_from_the_checkpoint():
    saved = {"epoch": 0, "sample_in_epoch": 64, "num_canonical_nodes": 4, "shuffle_seed": 0}
    assert resolve_canonical_nodes(DataConfig(), saved) == 4
    assert resolve_canonical_nodes(DataConfig(num_canonical_nodes=4), saved) == 4
    with pytest.raises(ConfigError, match="data.num_canonical_nodes=2, but the checkpoint's sample order was built "
                       "with 4 canonical nodes"):
        resolve_canonical_nodes(DataConfig(num_canonical_nodes=2), saved)
    assert resolve_canonical_nodes(DataConfig(num_canonical_nodes=8), None) == 8
    assert resolve_canonical_nodes(DataConfig(), None) == 1  # this process: one node


def test_rank0_cuts_back_the_sample_logs_of_ranks_this_run_does_not_have(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for rank in (0, 1):
        lines = [{"step": step, "micro": 0, "uids": [f"{rank}-{step}"], "skipped": []} for step in (1, 2, 3)]
        (samples / f"rank_{rank:05d}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    SampleLog(tmp_path, rank=0, enabled=True, resume_step=2, world_size=1)
    assert {rank: [line["step"] for line in lines] for rank, lines in read_sample_logs(tmp_path).items()} == {
        0: [1, 2], 1: [1, 2]}
    SampleLog(tmp_path, rank=0, enabled=True, resume_step=None, world_size=1)  # a fresh start
    assert read_sample_logs(tmp_path) == {}


def test_ranks_the_checkpoint_did_not_have_get_distinct_reproducible_seeds():
    seeds = {ckpt.fresh_rank_seed(0, rank, 100) for rank in range(8)}
    assert len(seeds) == 8 and ckpt.fresh_rank_seed(0, 3, 100) == ckpt.fresh_rank_seed(0, 3, 100)
    assert ckpt.fresh_rank_seed(0, 3, 100) != ckpt.fresh_rank_seed(0, 3, 200)


def test_the_ds_config_cannot_force_universal_loading():
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["checkpoint"] = {"load_universal": True}
    with pytest.raises(DSConfigError, match="checkpoint.load_universal is set, but arra_ds decides it per resume"):
        fill_ds_config(ds, TrainConfig(micro_batch_size=4), OptimConfig(), world_size=1, hidden_size=64)


# ---- real runs (slow) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _ok(_run(1, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """2 ranks -> 1 rank, with the conversion interrupted once; returns (run_dir, what each stage left)."""
    run_dir = tmp_path_factory.mktemp("shrunk") / "run"
    seen = {}
    crashed = _run(2, run_dir, env=subprocess_env(**{ckpt.KILL_DURING_SAVE_ENV: RESUME_STEP + 1}))
    assert crashed.returncode != 0
    source = _tag_dir(run_dir, RESUME_STEP)
    seen["hashes_before"] = _hashes(source)

    killed = _run(1, run_dir, "train.resume=auto", env=subprocess_env(**{ckpt.KILL_DURING_CONVERSION_ENV: 1}))
    seen["killed_rc"] = killed.returncode
    seen["killed_log"] = killed.stdout + killed.stderr
    seen["killed_listing"] = sorted(p.name for p in source.iterdir())
    seen["killed_latest"] = checkpoints.read_latest(run_dir / checkpoints.CHECKPOINTS_DIR)
    seen["hashes_after_kill"] = _hashes(source)

    seen["finished_log"] = _ok(_run(1, run_dir, "train.resume=auto")).stdout
    seen["hashes_after"] = _hashes(source)
    return run_dir, seen


@pytest.fixture(scope="module")
def grown(reference, tmp_path_factory):
    """1 rank -> 2 ranks: the reference cut back to its step-3 checkpoint, resumed on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("grown") / "run"
    shutil.copytree(reference, run_dir)
    root = run_dir / checkpoints.CHECKPOINTS_DIR
    for step in range(RESUME_STEP + 1, MAX_STEPS + 1):
        shutil.rmtree(root / checkpoints.tag_for(step))
    (root / checkpoints.LATEST).write_text(checkpoints.tag_for(RESUME_STEP))
    proc = _ok(_run(2, run_dir, "train.resume=auto"))
    return run_dir, proc.stdout


@pytest.fixture(params=["shrunk", "grown"])
def resumed(request):
    """(run dir, ranks before, ranks after) of each elastic resume."""
    run_dir = request.getfixturevalue(request.param)[0]
    return (run_dir, 2, 1) if request.param == "shrunk" else (run_dir, 1, 2)


# ---- the run continues ---------------------------------------------------------------------------


@pytest.mark.slow
def test_losses_lr_and_counters_continue_as_in_the_uninterrupted_run(resumed, reference):
    run_dir, _, after = resumed
    expected, got = _metrics(reference), _metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))  # each step logged once
    for want, have in zip(expected, got):
        for key in LOSS_KEYS:
            assert have[key] == pytest.approx(want[key], rel=LOSS_RTOL), (want["step"], key, want[key], have[key])
        assert have["grad_norm"] == pytest.approx(want["grad_norm"], rel=100 * LOSS_RTOL)
        assert have["lr"] == want["lr"] and have["samples_seen"] == want["samples_seen"] == want["step"] * GLOBAL_BATCH
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == RESUME_STEP and summary["steps"] == MAX_STEPS
    final = _tag_dir(run_dir, MAX_STEPS)
    assert checkpoints.verify(final)["world_size"] == after
    state = ckpt.read_trainer_state(final)
    assert (state.world_size, state.global_batch_size, state.samples_seen) == (after, GLOBAL_BATCH, MAX_STEPS * GLOBAL_BATCH)


@pytest.mark.slow
def test_every_sample_is_seen_once_per_epoch_whatever_the_ranks(resumed, reference):
    run_dir, before, after = resumed
    logs = read_sample_logs(run_dir)
    # ranks that exist only before the resume keep their lines up to the checkpoint, none after it
    assert sorted(logs) == list(range(max(before, after)))
    for rank, lines in logs.items():
        ranks_then = [before if line["step"] <= RESUME_STEP else after for line in lines]
        assert all(rank < n for n in ranks_then), rank

    def by_step(run):
        consumed = defaultdict(list)
        for lines in read_sample_logs(run).values():
            for line in lines:
                consumed[line["step"]] += line["uids"] + line["skipped"]
        return consumed

    got, want = by_step(run_dir), by_step(reference)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in got:  # every update is made of the same samples as the uninterrupted run's
        assert sorted(got[step]) == sorted(want[step]), step
    all_uids = {uid for step in range(1, STEPS_PER_EPOCH + 1) for uid in want[step]}
    assert len(all_uids) == NUM_SAMPLES  # the uninterrupted run saw every sample in its first epoch
    for first in range(1, MAX_STEPS + 1, STEPS_PER_EPOCH):
        epoch = [uid for step in range(first, min(first + STEPS_PER_EPOCH, MAX_STEPS + 1)) for uid in got[step]]
        assert len(epoch) == len(set(epoch)), first  # no sample twice in an epoch
        if first + STEPS_PER_EPOCH <= MAX_STEPS + 1:
            assert set(epoch) == all_uids  # a whole epoch: every sample once


@pytest.mark.slow
def test_parameters_and_optimizer_moments_after_the_first_resumed_step_match(resumed, reference, tmp_path):
    run_dir, _, _ = resumed
    step = RESUME_STEP + 1
    # the resumed run's own optimizer state: Adam's step counter advanced once per update, and every
    # parameter group kept its weight decay (DeepSpeed's ZeRO-3 universal load shares one step tensor
    # between groups and copies group 0's hyper-parameters into all)
    for path in sorted(_tag_dir(run_dir, step).glob("*optim_states.pt")):
        optim = torch.load(path, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
        assert [float(s["step"]) for s in optim["state"].values()] == [step] * len(optim["state"]), path
        assert [g["weight_decay"] for g in optim["param_groups"]] == [WEIGHT_DECAY, 0.0], path
    # full tensors through DeepSpeed's converter: fp32 weights and both moments of every parameter
    want = convert_to_universal(_tag_dir(reference, step), tmp_path / "reference") / "zero"
    got = convert_to_universal(_tag_dir(run_dir, step), tmp_path / "resumed") / "zero"
    names = sorted(p.name for p in want.iterdir() if p.is_dir())
    assert names and names == sorted(p.name for p in got.iterdir() if p.is_dir())
    for state, tol in STATE_TOL.items():
        reference_values = [torch.load(want / name / f"{state}.pt", weights_only=False) for name in names]
        resumed_values = [torch.load(got / name / f"{state}.pt", weights_only=False) for name in names]
        scale = max(v.abs().max().item() for v in reference_values)
        worst = max((a - b).abs().max().item() for a, b in zip(reference_values, resumed_values))
        assert worst <= tol * scale, (state, worst, scale)


# ---- the conversion -------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_interrupted_conversion_leaves_the_checkpoint_intact_and_the_next_start_succeeds(shrunk):
    run_dir, seen = shrunk
    assert seen["killed_rc"] == -9, seen["killed_log"][-3000:]
    assert "was written by 2 ranks, this run has 1: converting it" in seen["killed_log"]
    # the converted files lie in universal.partial, never committed; the checkpoint itself is untouched
    assert "universal.partial" in seen["killed_listing"] and checkpoints.UNIVERSAL_DIR not in seen["killed_listing"]
    assert seen["killed_latest"] == checkpoints.tag_for(RESUME_STEP)
    assert seen["hashes_after_kill"] == seen["hashes_before"] == seen["hashes_after"]
    source = _tag_dir(run_dir, RESUME_STEP)
    checkpoints.check_contents(source, checkpoints.verify(source))

    log = seen["finished_log"]
    assert f"{checkpoints.tag_for(RESUME_STEP)}/universal.partial" in log  # removed at the start
    assert f"resumed from {source} at step {RESUME_STEP}" in log and "on 1 rank(s), written by 2" in log
    universal = checkpoints.verify(source / checkpoints.UNIVERSAL_DIR)  # the cache: complete, with a manifest
    assert universal["world_size"] == 2 and universal["step"] == RESUME_STEP
    assert not (source / "universal.partial").exists()


@pytest.mark.slow
def test_a_resume_on_the_same_number_of_ranks_needs_no_conversion(grown, reference):
    """After the growth every checkpoint is a 2-rank one; before it, the 1-rank reference's: neither
    was converted except the one the resume started from."""
    run_dir, log = grown
    converted = sorted(p.parent.name for p in (run_dir / checkpoints.CHECKPOINTS_DIR).glob(f"*/{checkpoints.UNIVERSAL_DIR}"))
    assert converted == [checkpoints.tag_for(RESUME_STEP)]
    assert not list((reference / checkpoints.CHECKPOINTS_DIR).glob(f"*/{checkpoints.UNIVERSAL_DIR}"))
    assert "was written by 1 ranks, this run has 2" in log


@pytest.mark.slow
def test_the_run_config_records_the_global_batch_and_the_canonical_node_count(resumed):
    run_dir, _, _ = resumed
    config = yaml.safe_load((run_dir / checkpoints.RUN_CONFIG_FILE).read_text())
    assert config["train"]["global_batch_size"] == GLOBAL_BATCH
    assert config["data"]["num_canonical_nodes"] == 1  # one node at the first start
    loader = ckpt.read_trainer_state(_tag_dir(run_dir, MAX_STEPS)).loader
    assert loader["num_canonical_nodes"] == 1 and loader["initial_physical_nodes"] == 1
