"""Atomic, verifiable training checkpoints with retention and a disk-space guard.

Layout of ``<output_dir>/checkpoints/``:

    latest                     the tag of the newest complete checkpoint (replaced atomically)
    step_00000100/             a complete checkpoint:
      *_model_states.pt, *_optim_states.pt   DeepSpeed engine state (under ZeRO-3 one pair per rank)
      rng_rank_00000.pt ...    each rank's RNG states (loaded with torch.load(weights_only=True))
      trainer_state.json       step, samples seen, streaming loader state, skip counters, world size
      manifest.json            every file with its size, the commit order and time; written last
    step_00000200.partial/     a save in progress, or one interrupted by a crash: never loaded

A save writes everything into ``<tag>.partial``, fsyncs it (every node flushes the files its ranks
wrote), writes the manifest, renames the directory to ``<tag>`` and only then replaces ``latest``
(write a temp file, fsync, rename, fsync the directory). A crash at any point leaves ``latest``
naming the previous complete checkpoint. On load the manifest (file sizes) and the zip CRCs of the
torch files are checked first, so a truncated, deleted or corrupt file is reported by name instead of
failing deep inside ``torch.load`` (or, worse, loading wrong weights without any error).

All functions are called on every rank (they contain barriers); only rank 0 touches shared files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from arra_ds import dist

LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
FORMAT_VERSION = 1
_TAG = re.compile(r"^step_(\d{8})$")
# Without a previous checkpoint to measure: fp32 master weights + Adam's two moments (4 B each) and
# the module's own weights (up to 4 B) per parameter.
BYTES_PER_PARAM_ESTIMATE = 16
# Test hook: every rank kills itself with SIGKILL in the middle of writing this step's checkpoint.
KILL_DURING_SAVE_ENV = "ARRA_DS_TEST_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


@dataclass
class TrainerState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer updates done
    samples_seen: int = 0
    skipped_overlong: int = 0  # data.overlong=skip, summed over ranks
    truncated_overlong: int = 0  # data.overlong=truncate, summed over ranks
    loader: dict = field(default_factory=dict)  # StreamingDataLoader.state_dict()
    world_size: int = 1


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG states (per rank) --------------------------------------------------------------------


def rng_state() -> dict:
    """This rank's RNG states as plain tensors/ints, loadable with ``weights_only=True``."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


# ---- small durable-write helpers ----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _any_rank(flag: bool) -> bool:
    return bool(dist.all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)


# ---- reading --------------------------------------------------------------------------------------


def read_latest(root: Path) -> str | None:
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        partial = " (an interrupted save?)" if str(ckpt_dir).endswith(PARTIAL_SUFFIX) else ""
        raise CheckpointError(
            f"{ckpt_dir} is not a complete arra_ds checkpoint{partial}: {MANIFEST} is missing. "
            f"Complete checkpoints next to it: {[p.name for p in committed(Path(ckpt_dir).parent)] or 'none'}"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["files"], manifest["step"], manifest["world_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint {ckpt_dir} cannot be trusted") from e
    return manifest


def verify(ckpt_dir: Path) -> dict:
    """Check that every file the manifest lists exists with its recorded size; return the manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for rel, size in manifest["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {ckpt_dir / MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {path} is {actual} bytes, but {size} bytes were written (truncated or overwritten); "
                f"resume from another checkpoint with train.resume=<dir>. Complete checkpoints: "
                f"{[p.name for p in committed(ckpt_dir.parent) if p != ckpt_dir] or 'none'}"
            )
    return manifest


def committed(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (tag dirs with a manifest), oldest commit first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and _TAG.match(path.name) and (path / MANIFEST).is_file():
            try:
                sequence = int(json.loads((path / MANIFEST).read_text())["sequence"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            found.append((sequence, path.name, path))
    return [p for _, _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``train.resume`` -> the checkpoint directory to load, or None for a fresh start."""
    if not resume:
        return None
    if resume == "auto":
        tag = read_latest(root)
        if tag is None:
            return None
        path = Path(root) / tag
        if not path.is_dir():
            raise CheckpointError(
                f"{Path(root) / LATEST} names {tag!r}, but {path} does not exist. Complete checkpoints: "
                f"{[p.name for p in committed(root)] or 'none'}; pick one with train.resume=<dir>"
            )
        return path
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
    return path


def check_contents(ckpt_dir: Path, manifest: dict, rank: int = 0, world: int = 1) -> None:
    """CRC-check this rank's share (every ``world``-th) of the checkpoint's torch files.

    ``torch.save`` writes zip archives with a CRC32 per member, but ``torch.load`` does not check
    them, so a flipped byte inside a tensor would load silently as a wrong weight. Checking reads the
    files once; spread over the ranks, each reads 1/world of the checkpoint.
    """
    torch_files = sorted(rel for rel in manifest["files"] if rel.endswith(".pt"))
    for rel in torch_files[rank::world]:
        path = Path(ckpt_dir) / rel
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"checkpoint file {path} is unreadable ({e})") from e
        if bad is not None:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its member {bad} fails the CRC check; resume from another "
                f"checkpoint with train.resume=<dir>. Complete checkpoints: "
                f"{[p.name for p in committed(Path(ckpt_dir).parent) if p != Path(ckpt_dir)] or 'none'}"
            )


def load_checkpoint(engine, ckpt_dir: Path) -> TrainerState:
    """Restore the engine, this rank's RNG states and the trainer state from ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    manifest = verify(ckpt_dir)
    world = dist.world_size()
    if manifest["world_size"] != world:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written by {manifest['world_size']} ranks, this run has {world}: ZeRO-3 "
            "partitions the optimizer state per rank, so resume with the same number of ranks (or export the "
            "weights with launch/export_hf.py and start a new run from them)"
        )
    problem = None
    try:
        check_contents(ckpt_dir, manifest, dist.rank(), world)
    except CheckpointError as e:
        problem = e
    if _any_rank(problem is not None):  # every rank stops, none waits in a collective
        raise problem or CheckpointError(f"checkpoint {ckpt_dir} has a corrupt file (named in another rank's error)")
    try:
        engine.load(ckpt_dir.parent, ckpt_dir.name)
    except Exception as e:  # DeepSpeed's own errors do not always name the file
        raise CheckpointError(f"cannot load the DeepSpeed state of checkpoint {ckpt_dir}: {type(e).__name__}: {e}") from e
    rng_path = ckpt_dir / _rng_file(dist.rank())
    try:
        set_rng_state(torch.load(rng_path, weights_only=True))
    except Exception as e:
        raise CheckpointError(f"cannot read RNG state file {rng_path}: {type(e).__name__}: {e}") from e
    state_path = ckpt_dir / TRAINER_STATE
    try:
        return TrainerState(**json.loads(state_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"cannot read trainer state {state_path}: {e}") from e


# ---- writing --------------------------------------------------------------------------------------


def clean_interrupted(root: Path) -> list[str]:
    """At start, on rank 0: drop ``*.partial`` dirs; restore a ``*.replaced`` dir whose successor is gone."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        elif path.name.endswith(REPLACED_SUFFIX):
            original = root / path.name[: -len(REPLACED_SUFFIX)]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(original)
    return removed


def _commit(root: Path, partial: Path, tag: str, state: TrainerState) -> Path:
    """Rank 0: manifest, rename ``<tag>.partial`` -> ``<tag>``, then point ``latest`` at it."""
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    previous = committed(root)
    manifest = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "world_size": state.world_size,
        "sequence": 1 + (read_manifest(previous[-1])["sequence"] if previous else 0),  # commit order
        "committed_at": time.time(),
        "files": files,
    }
    _write_durably(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
    final = root / tag
    replaced = root / (tag + REPLACED_SUFFIX)
    if final.exists():  # same step saved before (a resume from an older checkpoint)
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    partial.rename(final)
    _fsync_dir(root)
    _write_durably(root / LATEST, tag.encode())
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (0 keeps all); never ``latest``."""
    if keep_last <= 0:
        return []
    latest = read_latest(root)
    old = [p for p in committed(root)[:-keep_last] if p.name != latest]
    for path in old:
        # Rename first so a crash mid-delete leaves no half-deleted dir that looks complete.
        doomed = path.with_name(path.name + PARTIAL_SUFFIX)
        path.rename(doomed)
        shutil.rmtree(doomed)
    return [p.name for p in old]


def save_checkpoint(engine, root: Path, state: TrainerState, keep_last: int) -> Path:
    """Write a complete checkpoint of ``state.step`` atomically; returns its directory."""
    root = Path(root)
    tag = tag_for(state.step)
    partial = root / (tag + PARTIAL_SUFFIX)
    if dist.is_rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save(root, partial.name)
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(state.step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(rng_state(), partial / _rng_file(dist.rank()))
    if dist.is_rank0():
        (partial / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
    dist.barrier()
    if dist.local_rank() == 0:  # each node flushes what its ranks wrote (shared file systems cache per node)
        _fsync_tree(partial)
    dist.barrier()
    final = root / tag
    if dist.is_rank0():
        final = _commit(root, partial, tag, state)
        prune(root, keep_last)
    dist.barrier()
    return final


# ---- disk space -----------------------------------------------------------------------------------


def estimate_checkpoint_bytes(root: Path, num_params: int) -> tuple[int, str]:
    """(bytes, how it was estimated) for the next checkpoint."""
    previous = committed(root)
    if previous:
        manifest = read_manifest(previous[-1])
        return sum(manifest["files"].values()), f"the size of the last checkpoint {previous[-1].name}"
    return (
        num_params * BYTES_PER_PARAM_ESTIMATE,
        f"{num_params:,} parameters x {BYTES_PER_PARAM_ESTIMATE} bytes (fp32 weights + Adam moments + module weights)",
    )


def ensure_disk_space(root: Path, num_params: int) -> None:
    """Raise on every rank when any rank's checkpoint file system cannot hold one more checkpoint."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    needed, how = estimate_checkpoint_bytes(root, num_params)
    free = shutil.disk_usage(root).free
    if _any_rank(free < needed):
        raise CheckpointError(
            f"not enough disk space for the next checkpoint in {root}: it needs about {needed / 2**30:.2f} GiB "
            f"({needed:,} bytes, {how}); rank {dist.rank()} sees {free / 2**30:.2f} GiB ({free:,} bytes) free"
            f"{'' if free < needed else ', another rank less'}. Free space, lower train.keep_last, or set "
            "output_dir to a larger file system"
        )
