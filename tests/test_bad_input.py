"""Bad input gets a clear error or a counted skip: features, over-long samples, shards, pickle columns,
stale shared memory and two datasets claiming one, ds_configs. (Unreadable checkpoints: tests/test_resilience.py, which has real ones.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import streaming.base.dataset as streaming_dataset
import streaming.base.shared.prefix as streaming_prefix
import torch
from conftest import REPO_ROOT, subprocess_env
from streaming import MDSWriter, StreamingDataset
from streaming.base.constant import SHM_TO_CLEAN

from arra_ds.data.loader import (
    DataConfig,
    build_dataloader,
    build_dataset,
    ensure_streaming_env,
    remove_stale_shared_memory,
)
from arra_ds.data.schema import SchemaError, columns_for
from arra_ds.data.shards import ShardError
from arra_ds.data.shm import serialised_get_shm_prefix, streaming_shm_blocks
from arra_ds.tokens.vocab import build_debug_vocab
from arra_ds.train.engine import DSConfigError, fill_ds_config, load_ds_config
from arra_ds.train.run_config import load_run_config


def _write(out, lengths, feature_dims=None, columns=None, samples_per_shard=None):
    """An MDS data set with one sample per entry of ``lengths`` (tokens 0..n-1, prompt 2)."""
    feature_dims = feature_dims or [4] * len(lengths)
    size_limit = None
    if samples_per_shard:
        size_limit = samples_per_shard * (max(lengths) * 4 + max(feature_dims) * 2 + 96)
    with MDSWriter(out=str(out), columns=columns or columns_for(["x"]), size_limit=size_limit, progress_bar=False) as w:
        for i, (n, d) in enumerate(zip(lengths, feature_dims)):
            w.write({"tokens": np.arange(n, dtype=np.int32), "prompt_len": np.int32(2),
                     "feat_x": np.full(d, 0.5, np.float16), "caption": "c", "uid": f"u{i}"})
    return out


def _loader(path, micro, feature="feat_x", feature_dim=0, **data):
    cfg = DataConfig(path=str(path), shuffle=False, pad_to_multiple_of=1, **data)
    dataset = build_dataset(cfg, micro, seed=0, feature_column=feature, remote=None, local=str(path))
    dataset.converter.feature_dim = feature_dim
    return dataset, build_dataloader(dataset, cfg, micro, pad_id=build_debug_vocab().pad_id)


# ---- feature columns -----------------------------------------------------------------------------


def test_a_sample_with_a_different_feature_width_is_named(tmp_path):
    path = _write(tmp_path / "d", [6] * 4, feature_dims=[4, 4, 3, 4])
    _, loader = _loader(path, micro=4, feature_dim=4)
    with pytest.raises(ValueError, match=r"sample 'u2': column feat_x has shape \[3\], expected \[4\]"):
        next(iter(loader))


def test_a_missing_feature_column_lists_the_present_ones(tmp_path):
    path = _write(tmp_path / "d", [6] * 2)
    with pytest.raises(SchemaError, match=r"no feature column 'feat_clip'. Features in it: \['x'\]"):
        _loader(path, micro=2, feature="feat_clip")


# ---- over-long sequences -------------------------------------------------------------------------


def test_overlong_skip_leaves_samples_out_counts_them_and_keeps_the_stream_position(tmp_path):
    path = _write(tmp_path / "d", [6, 30, 7, 8, 31, 32, 33, 34, 5, 6, 7, 8])
    _, loader = _loader(path, micro=4, max_seq_len=16, overlong="skip")
    batches = list(loader)
    metas = [b["meta"] for b in batches]
    assert [m.uids for m in metas] == [["u0", "u2", "u3"], [], ["u8", "u9", "u10", "u11"]]
    assert [m.skipped_uids for m in metas] == [["u1"], ["u4", "u5", "u6", "u7"], []]
    assert batches[0]["input_ids"].shape == (3, 8)
    # all four skipped: the batch is the first of them cut to max_seq_len (a filler the loop zeroes)
    filler = batches[1]
    assert metas[1].num_samples == 0
    assert filler["input_ids"].tolist() == [list(range(16))] and filler["target_features"].shape == (1, 4)
    # the loader state counts consumed samples (kept + skipped), not rows
    _, loader = _loader(path, micro=4, max_seq_len=16, overlong="skip")
    it = iter(loader)
    next(it), next(it)
    assert loader.state_dict()["sample_in_epoch"] == 8


def test_overlong_truncate_is_counted(tmp_path):
    path = _write(tmp_path / "d", [6, 30, 7, 40])
    _, loader = _loader(path, micro=4, max_seq_len=16, overlong="truncate")
    batch = next(iter(loader))
    assert batch["meta"].num_truncated == 2 and batch["input_ids"].shape == (4, 16)


def test_a_filler_batch_takes_the_normal_path_and_zeroed_adds_nothing():
    """The filler must run the same modules and produce gradients for the same parameters as any batch
    (ZeRO-3 lock-step); multiplied by zero, as the loop does, it leaves every gradient at zero."""
    from arra_ds.data.loader import Collator, SampleConverter
    from arra_ds.model.arra import build_model
    from arra_ds.tokens.layout import conversation_tokens, image_to_tokens

    cfg = load_run_config(None, ["align.feature_dim=4", "model.activation_checkpointing=false"])
    model = build_model(cfg.model, cfg.align)
    vocab = model.vocab
    codes = torch.arange(16).view(4, 4) % vocab.num_image_codes
    tokens, prompt_len = conversation_tokens([vocab.id("a"), vocab.id("red")], image_to_tokens(codes, vocab), vocab)
    converter = SampleConverter("feat", max_seq_len=12, overlong="skip")
    sample = {"tokens": np.asarray(tokens, np.int32), "prompt_len": prompt_len, "feat": np.ones(4, np.float16), "uid": "u"}
    filler = Collator(vocab.pad_id, 8)([converter(sample)])
    assert filler["meta"].num_samples == 0 and filler["meta"].skipped_uids == ["u"]

    out = model(filler)
    assert out.num_tokens > 0 and out.num_aligned > 0  # the full LM-loss and alignment path ran
    (out.loss * 0.0).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


# ---- shards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    ("empty", r"shard .*shard.00001.mds is 0 bytes, index.json says \d+ \(empty, truncated or overwritten\)"),
    ("truncated", r"shard .*shard.00001.mds is \d+ bytes, index.json says \d+"),
    ("header", r"shard .*shard.00001.mds says it holds 99 samples, index.json says \d+"),
    ("offsets", r"shard .*shard.00001.mds has a corrupt offset table"),
    ("missing", r"shard .*shard.00001.mds listed in .*index.json does not exist"),
])
def test_a_bad_shard_is_named_before_training(tmp_path, damage, message):
    path = _write(tmp_path / "d", [6] * 12, samples_per_shard=4)
    shard = path / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    if damage == "empty":
        shard.write_bytes(b"")
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:-10]))
    elif damage == "header":
        data[:4] = np.uint32(99).tobytes()
        shard.write_bytes(bytes(data))
    elif damage == "offsets":
        data[4:8] = np.uint32(1 << 30).tobytes()
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(ShardError, match=message):
        _loader(path, micro=4)


def test_pickle_columns_are_refused(tmp_path):
    columns = {**columns_for(["x"]), "extra": "pkl"}
    path = tmp_path / "d"
    with MDSWriter(out=str(path), columns=columns, progress_bar=False) as w:
        w.write({"tokens": np.arange(4, dtype=np.int32), "prompt_len": np.int32(1), "feat_x": np.ones(2, np.float16),
                 "caption": "c", "uid": "u", "extra": {"anything": 1}})
    with pytest.raises(SchemaError, match=r"pickle-encoded columns \['extra'\]"):
        _loader(path, micro=1)


# ---- stale shared memory -------------------------------------------------------------------------

_HOLD_DATASET = textwrap.dedent("""
    import sys
    from arra_ds.data.loader import DataConfig, build_dataloader, build_dataset
    cfg = DataConfig(path="s3://unused", cache_dir=sys.argv[2])
    dataset = build_dataset(cfg, 2, 0, "feat_x", remote=sys.argv[1], local=sys.argv[2])
    next(iter(build_dataloader(dataset, cfg, 2, 0)))
    print(f"{dataset._shm_prefix_int:06d}", flush=True)
    sys.stdin.read()  # hold the shared memory until told to go
""")


def _hold_dataset(source, local):
    """A process (in its own session) that builds a streaming dataset and keeps it; prints its shm prefix."""
    return subprocess.Popen([sys.executable, "-c", _HOLD_DATASET, str(source), str(local)], cwd=REPO_ROOT,
                            env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_stale_shared_memory_of_a_killed_run_is_removed_and_live_memory_kept(tmp_path):
    source = _write(tmp_path / "src", [6] * 8)
    # One after the other, so that each has built its dataset before the next (see the race test below).
    crashed = _hold_dataset(source, tmp_path / "cache_a")
    crashed_prefix = crashed.stdout.readline().strip()
    alive = _hold_dataset(source, tmp_path / "cache_b")
    try:
        alive_prefix = alive.stdout.readline().strip()
        assert crashed_prefix and alive_prefix, "the helper processes did not build their datasets"
        assert crashed_prefix != alive_prefix
        os.killpg(crashed.pid, signal.SIGKILL)  # with its resource tracker, as a node failure or OOM kill would
        crashed.wait()
        blocks = streaming_shm_blocks()
        assert any(b.startswith(crashed_prefix + "_") for b in blocks)

        remove_stale_shared_memory()  # what every run does before building datasets

        blocks = streaming_shm_blocks()
        assert not any(b.startswith(crashed_prefix + "_") for b in blocks)
        assert any(b.startswith(alive_prefix + "_") for b in blocks)
    finally:
        alive.communicate("", timeout=60)


_STREAMING_SCAN = streaming_prefix._check_and_find_retrying  # streaming's own, whatever a test patched in


def _race_for_a_prefix(local, monkeypatch, get_shm_prefix, scan_wait_s: float) -> list[str]:
    """Two StreamingDatasets on one local directory built at the same moment (two jobs on a host, e.g. the
    study's parallel runs), as two threads: shm names and flocks are host-wide, so threads race as processes
    do. Each stops after choosing its prefix until the other has chosen too (or ``scan_wait_s`` passes)."""
    monkeypatch.setattr(streaming_dataset, "get_shm_prefix", get_shm_prefix)
    both_chose = threading.Barrier(2, timeout=scan_wait_s)

    def scan_then_wait(local_dirs, remote_dirs, shm_name, retry):
        found = _STREAMING_SCAN(local_dirs, remote_dirs, shm_name, retry)
        if shm_name == SHM_TO_CLEAN[-1]:  # the prefix is chosen (the last name scanned), not yet created
            try:
                both_chose.wait()
            except threading.BrokenBarrierError:
                pass
        return found

    monkeypatch.setattr(streaming_prefix, "_check_and_find_retrying", scan_then_wait)
    results = []

    def build():
        try:
            dataset = StreamingDataset(local=str(local), batch_size=1)
            results.append(f"prefix {dataset._shm_prefix_int}")
        except Exception as e:
            results.append(f"error {type(e).__name__}: {e}")

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(results)


def test_two_jobs_building_datasets_at_once_claim_different_prefixes(tmp_path, monkeypatch):
    source = _write(tmp_path / "src", [6] * 4)
    # Streaming alone: both choose the same prefix, the second create fails (the flaky study failure).
    plain = _race_for_a_prefix(source, monkeypatch, streaming_prefix.get_shm_prefix, scan_wait_s=60)
    assert plain[0].startswith("error FileExistsError") and "_locals" in plain[0], plain
    assert plain[1].startswith("prefix "), plain
    # What every arra_ds process installs: the second scans only once the first has created its block
    # (the first waits out scan_wait_s for a scan that cannot happen meanwhile), and takes the next prefix.
    ensure_streaming_env()
    assert streaming_dataset.get_shm_prefix is serialised_get_shm_prefix
    serialised = _race_for_a_prefix(source, monkeypatch, serialised_get_shm_prefix, scan_wait_s=1)
    assert all(line.startswith("prefix ") for line in serialised) and len(set(serialised)) == 2, serialised


# ---- ds_config vs run config ---------------------------------------------------------------------


def _zero3():
    return json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(gradient_accumulation_steps=3), r"gradient_accumulation_steps=3 contradicts"),
    (lambda d: d.update(train_batch_size=64), r"train_batch_size=64 contradicts .*train.global_batch_size=8"),
    (lambda d: d.update(gradient_clipping=0.5), r"gradient_clipping=0.5 contradicts .*optim.grad_clip=1.0"),
    (lambda d: d["optimizer"]["params"].update(lr=0.1), r"optimizer.params.lr=0.1 contradicts .*optim.lr"),
    (lambda d: d["optimizer"]["params"].update(betas=[0.9, 0.999]), r"optimizer.params.betas=.* contradicts"),
    (lambda d: d["bf16"].update(enabled=True), r"bf16.enabled=True contradicts .*train.precision"),
    (lambda d: d.update(fp16={"enabled": True}), r"fp16 is not supported"),
    (lambda d: d["optimizer"].update(type="SGD"), r"optimizer.type='SGD' contradicts the run config"),
    (lambda d: d["optimizer"]["params"].update(adam_w_mode=False), r"adam_w_mode=false"),
    (lambda d: d.pop("optimizer"), r"no 'optimizer' section"),
])
def test_a_ds_config_contradicting_the_run_config_is_refused(edit, message):
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.global_batch_size=8"])
    ds = _zero3()
    edit(ds)
    with pytest.raises(DSConfigError, match=message):
        fill_ds_config(ds, cfg.train, cfg.optim, world_size=2, hidden_size=64)


def test_an_unreadable_ds_config_is_named(tmp_path):
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DSConfigError, match=f"{bad} is not valid JSON"):
        load_ds_config(bad)
