"""The checkpoint commit protocol in one process: atomic rename, ``latest``, retention, RNG round trip.

The engine here writes one file per save the way DeepSpeed's ``save_checkpoint(root, tag)`` writes
its partitions into ``root/tag``; the real 2-rank DeepSpeed runs (kill during a save, resume,
retention) are in tests/test_resilience.py; a checkpoint of another world size: tests/test_elastic.py.
"""

import random

import numpy as np
import pytest
import torch

from arra_ds import checkpoints
from arra_ds.train import checkpoint as ckpt


class FileWritingEngine:
    """Writes ``model_states.pt`` holding ``value`` into ``root/tag`` and reads it back."""

    def __init__(self, value=0):
        self.value = value

    def save(self, root, tag):
        torch.save({"value": torch.tensor(self.value)}, root / tag / "model_states.pt")

    def load(self, root, tag, universal=False):
        self.value = int(torch.load(root / tag / "model_states.pt", weights_only=True)["value"])


def _save(root, step, keep_last=0, value=None):
    engine = FileWritingEngine(step if value is None else value)
    return ckpt.save_checkpoint(engine, root, ckpt.TrainerState(step=step, samples_seen=8 * step), keep_last)


def test_save_commits_a_complete_directory_and_moves_latest(tmp_path):
    root = tmp_path / "checkpoints"
    path = _save(root, 2)
    assert path == root / "step_00000002" and checkpoints.read_latest(root) == "step_00000002"
    manifest = checkpoints.verify(path)
    assert set(manifest["files"]) == {"model_states.pt", "rng_rank_00000.pt", checkpoints.TRAINER_STATE}
    assert not list(root.glob("*.partial")) and not list(root.glob("*.tmp"))
    engine = FileWritingEngine()
    state = ckpt.load_checkpoint(engine, checkpoints.resolve_resume("auto", root))
    assert engine.value == 2 and state.step == 2 and state.samples_seen == 16


def test_keep_last_deletes_the_oldest_by_commit_order(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _save(root, step, keep_last=2)
    assert [p.name for p in checkpoints.committed(root)] == ["step_00000006", "step_00000008"]
    # a run resumed from step 6 saves step 7: the abandoned step 8 is the older commit now
    _save(root, 7, keep_last=2)
    assert [p.name for p in checkpoints.committed(root)] == ["step_00000008", "step_00000007"]
    assert checkpoints.read_latest(root) == "step_00000007"


def test_resaving_a_step_replaces_it_and_an_interrupted_replacement_is_undone(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4, value=1)
    _save(root, 4, value=2)
    engine = FileWritingEngine()
    ckpt.load_checkpoint(engine, root / "step_00000004")
    assert engine.value == 2 and not list(root.glob("*.replaced"))
    # a crash between moving the old step_4 aside and renaming the new one into place
    (root / "step_00000004").rename(root / "step_00000004.replaced")
    (root / "step_00000006.partial").mkdir()
    assert ckpt.clean_interrupted(root) == ["step_00000006.partial"]
    assert checkpoints.verify(checkpoints.resolve_resume("auto", root))["step"] == 4


def test_latest_naming_a_missing_directory_is_explained(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / checkpoints.LATEST).write_text("step_00000009")
    with pytest.raises(checkpoints.CheckpointError, match=r"names 'step_00000009', but .* does not exist. Complete "
                       r"checkpoints: \['step_00000002'\]"):
        checkpoints.resolve_resume("auto", root)
    assert checkpoints.resolve_resume("", root) is None
    with pytest.raises(checkpoints.CheckpointError, match="no such checkpoint directory"):
        checkpoints.resolve_resume(str(tmp_path / "nope"), root)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_without_a_previous_checkpoint_the_estimate_comes_from_the_parameter_count(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    needed, how = ckpt.estimate_checkpoint_bytes(root, num_params=1000)
    assert needed == 1000 * ckpt.BYTES_PER_PARAM_ESTIMATE and "1,000 parameters" in how
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(checkpoints.CheckpointError, match=r"16,000 bytes, 1,000 parameters x 16 bytes"):
        ckpt.ensure_disk_space(root, num_params=1000)
