"""Writing training checkpoints: atomic commit, retention, a disk-space guard, and resume.

The layout, manifests and verification are ``arra_ds/checkpoints.py``. A save writes everything into
``<tag>.partial``, fsyncs it (every node flushes the files its ranks wrote), writes the manifest,
renames the directory to ``<tag>`` and only then replaces ``latest`` (write a temp file, fsync,
rename, fsync the directory). A crash at any point leaves ``latest`` naming the previous complete
checkpoint.

All functions are called on every rank (they contain barriers); only rank 0 touches shared files.

Elastic resume: a checkpoint written by another number of ranks is converted once, on rank 0, with
DeepSpeed's own universal-checkpoint converter into ``<tag>/universal`` (written as
``universal.partial`` and renamed, with its own manifest, like a save), and DeepSpeed repartitions it
over this run's ranks, Adam's moments included. The same number of ranks loads the checkpoint itself
(the fast path, bitwise exact). RNG states: rank r continues the stream it saved when the checkpoint
has a rank r; a rank the checkpoint did not have starts a fresh stream seeded from (seed, rank, step),
so such a resume is reproducible but its dropout masks are not those of any uninterrupted run (with
another number of ranks every sample is on another rank anyway).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from arra_ds import distributed
from arra_ds.checkpoints import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    PARTIAL_SUFFIX,
    REPLACED_SUFFIX,
    TRAINER_STATE,
    UNIVERSAL_DIR,
    CheckpointError,
    check_contents,
    committed,
    read_latest,
    read_manifest,
    rng_file,
    tag_for,
    verify,
)
from arra_ds.io import atomic_write, atomic_write_json, fsync_dir, fsync_tree
from arra_ds.train.run_config import TrainConfig

# Without a previous checkpoint to measure: fp32 master weights + Adam's two moments (4 B each) and
# the module's own weights (up to 4 B) per parameter.
BYTES_PER_PARAM_ESTIMATE = 16
# The universal conversion holds the optimizer state twice at its peak (per-rank fragments, then the
# merged tensors), on top of the checkpoint it reads.
CONVERSION_SPACE_FACTOR = 2
# Test hook: every rank kills itself with SIGKILL in the middle of writing this step's checkpoint.
KILL_DURING_SAVE_ENV = "ARRA_DS_TEST_KILL_DURING_SAVE"
# Test hook: rank 0 kills itself with SIGKILL after the universal conversion wrote its files, before
# they are committed.
KILL_DURING_CONVERSION_ENV = "ARRA_DS_TEST_KILL_DURING_CONVERSION"


@dataclass
class TrainerState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer updates done
    samples_seen: int = 0
    skipped_overlong: int = 0  # data.overlong=skip, summed over ranks
    truncated_overlong: int = 0  # data.overlong=truncate, summed over ranks
    loader: dict = field(default_factory=dict)  # StreamingDataLoader.state_dict()
    world_size: int = 1
    global_batch_size: int = 0  # samples per update; 0 in checkpoints written before it was recorded


def read_trainer_state(ckpt_dir: Path) -> TrainerState:
    """The trainer state of a checkpoint (no engine needed: the run reads it before building the data)."""
    state_path = Path(ckpt_dir) / TRAINER_STATE
    try:
        state = TrainerState(**json.loads(state_path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"cannot read trainer state {state_path}: {e}") from e
    if not state.global_batch_size and state.step:
        state.global_batch_size = state.samples_seen // state.step  # every update adds one global batch
    return state


def resolve_global_batch(train: TrainConfig, resumed: TrainerState | None, world: int) -> int:
    """``train.global_batch_size`` for this start (the resolved run config records it).

    0 means micro batch x ranks of the run's first start: a resumed run keeps its checkpoint's global
    batch whatever its own number of ranks (gradient accumulation fills the gap), so a job requeued on
    another node count trains on. An explicit value is used as given.
    """
    if train.global_batch_size:
        if resumed is not None and resumed.global_batch_size and resumed.global_batch_size != train.global_batch_size:
            distributed.print0(
                f"train.global_batch_size={train.global_batch_size}: the global batch changes from "
                f"{resumed.global_batch_size} (the checkpoint's) at step {resumed.step}"
            )
        return train.global_batch_size
    if resumed is not None and resumed.global_batch_size:
        if resumed.global_batch_size % (train.micro_batch_size * world):
            raise CheckpointError(
                f"the checkpoint at step {resumed.step} trained with a global batch of {resumed.global_batch_size} "
                f"samples, which is not a multiple of {world} ranks x train.micro_batch_size={train.micro_batch_size} = "
                f"{world * train.micro_batch_size} samples per micro-step: pick a train.micro_batch_size that makes it "
                "one, or set train.global_batch_size to change the global batch"
            )
        return resumed.global_batch_size
    return train.micro_batch_size * world


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


def fresh_rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank that a resumed checkpoint did not have: distinct per rank and resume step."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def load_checkpoint(engine, ckpt_dir: Path, seed: int = 0) -> TrainerState:
    """Restore the engine, this rank's RNG states and the trainer state from ``ckpt_dir``.

    Written by another number of ranks: through the checkpoint's universal form (``universal_form``).
    ``seed`` (the run's) seeds the ranks the checkpoint did not have.
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = verify(ckpt_dir)
    world = distributed.world_size()
    saved_world = manifest["world_size"]
    problem = None
    try:
        check_contents(ckpt_dir, manifest, distributed.rank(), world)
    except CheckpointError as e:
        problem = e
    if distributed.any_rank(problem is not None):  # every rank stops, none waits in a collective
        raise problem or CheckpointError(f"checkpoint {ckpt_dir} has a corrupt file (named in another rank's error)")
    load_root, universal = ckpt_dir.parent, False
    if saved_world != world:
        load_root, universal = universal_form(engine, ckpt_dir, manifest), True
    try:
        engine.load(load_root, ckpt_dir.name, universal=universal)
    except Exception as e:  # DeepSpeed's own errors do not always name the file
        what = f"the universal form {load_root} of " if universal else ""
        raise CheckpointError(f"cannot load the DeepSpeed state of {what}checkpoint {ckpt_dir}: {type(e).__name__}: {e}") from e
    state = read_trainer_state(ckpt_dir)
    if distributed.rank() < saved_world:
        rng_path = ckpt_dir / rng_file(distributed.rank())
        try:
            set_rng_state(torch.load(rng_path, weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read RNG state file {rng_path}: {type(e).__name__}: {e}") from e
    else:
        distributed.seed_everything(fresh_rank_seed(seed, distributed.rank(), state.step))
    return state


# ---- the universal form (elastic resume) ----------------------------------------------------------


def _universal_is_complete(path: Path, manifest: dict) -> bool:
    try:
        universal = verify(path)
    except CheckpointError:
        return False
    return universal["step"] == manifest["step"] and universal["world_size"] == manifest["world_size"]


def _ensure_space_for_conversion(ckpt_dir: Path, manifest: dict) -> None:
    needed = CONVERSION_SPACE_FACTOR * sum(manifest["files"].values())
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        raise CheckpointError(
            f"not enough disk space to convert checkpoint {ckpt_dir} for another number of ranks: DeepSpeed's "
            f"universal conversion needs about {needed / 2**30:.2f} GiB ({needed:,} bytes, {CONVERSION_SPACE_FACTOR}x "
            f"the checkpoint), {free / 2**30:.2f} GiB ({free:,} bytes) are free. Free space, or resume with "
            f"{manifest['world_size']} ranks (no conversion)"
        )


def _convert(engine, ckpt_dir: Path, manifest: dict, target: Path) -> None:
    """Rank 0: DeepSpeed's converter into ``target.partial``, a manifest, then the rename to ``target``."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted conversion: start over
    shutil.rmtree(target, ignore_errors=True)  # incomplete or of another checkpoint (cannot happen by rename)
    _ensure_space_for_conversion(ckpt_dir, manifest)
    print(
        f"checkpoint {ckpt_dir} was written by {manifest['world_size']} ranks, this run has "
        f"{distributed.world_size()}: converting it to DeepSpeed's universal form in {target} (once; kept with "
        "the checkpoint)",
        flush=True,
    )
    start = time.perf_counter()
    partial.mkdir()
    try:
        engine.to_universal(ckpt_dir, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    if os.environ.get(KILL_DURING_CONVERSION_ENV):
        os.kill(os.getpid(), signal.SIGKILL)
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    universal_manifest = {
        "format": FORMAT_VERSION,
        "step": manifest["step"],
        "world_size": manifest["world_size"],  # of the checkpoint it was converted from
        "converted_at": time.time(),
        "files": files,
    }
    atomic_write(partial / MANIFEST, json.dumps(universal_manifest, indent=1), durable=True)
    fsync_tree(partial)
    partial.rename(target)
    fsync_dir(ckpt_dir)
    print(f"converted {ckpt_dir.name} in {time.perf_counter() - start:.1f}s", flush=True)


def universal_form(engine, ckpt_dir: Path, manifest: dict) -> Path:
    """The directory holding DeepSpeed's universal form of ``ckpt_dir`` (``<tag>/universal``, with the
    converted ``<tag>`` in it), converted by rank 0 on first use; every rank returns it."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir / UNIVERSAL_DIR
    problem = None
    if distributed.is_rank0() and not _universal_is_complete(target, manifest):
        try:
            _convert(engine, ckpt_dir, manifest, target)
        except CheckpointError as e:
            problem = e
        except Exception as e:  # the converter's own errors do not name the checkpoint
            problem = CheckpointError(
                f"cannot convert checkpoint {ckpt_dir} ({manifest['world_size']} ranks) to DeepSpeed's universal form "
                f"for {distributed.world_size()} ranks: {type(e).__name__}: {e}"
            )
            problem.__cause__ = e
    if distributed.any_rank(problem is not None):  # the other ranks wait here while rank 0 converts
        raise problem or CheckpointError(f"the universal conversion of {ckpt_dir} failed on rank 0 (see its error)")
    return target


# ---- writing --------------------------------------------------------------------------------------


def clean_interrupted(root: Path) -> list[str]:
    """At start, on rank 0: drop ``*.partial`` dirs (saves, and universal conversions inside a checkpoint);
    restore a ``*.replaced`` dir whose successor is gone."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for path in root.glob(f"*/{UNIVERSAL_DIR}{PARTIAL_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path.relative_to(root)))
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
    atomic_write(partial / MANIFEST, json.dumps(manifest, indent=1), durable=True)
    final = root / tag
    replaced = root / (tag + REPLACED_SUFFIX)
    if final.exists():  # same step saved before (a resume from an older checkpoint)
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    partial.rename(final)
    fsync_dir(root)
    atomic_write(root / LATEST, tag, durable=True)
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
    if distributed.is_rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier()
    engine.save(root, partial.name)
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(state.step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(rng_state(), partial / rng_file(distributed.rank()))
    if distributed.is_rank0():
        atomic_write_json(partial / TRAINER_STATE, asdict(state))
    distributed.barrier()
    if distributed.local_rank() == 0:  # each node flushes what its ranks wrote (shared file systems cache per node)
        fsync_tree(partial)
    distributed.barrier()
    final = root / tag
    if distributed.is_rank0():
        final = _commit(root, partial, tag, state)
        prune(root, keep_last)
    distributed.barrier()
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
    if distributed.any_rank(free < needed):
        raise CheckpointError(
            f"not enough disk space for the next checkpoint in {root}: it needs about {needed / 2**30:.2f} GiB "
            f"({needed:,} bytes, {how}); rank {distributed.rank()} sees {free / 2**30:.2f} GiB ({free:,} bytes) free"
            f"{'' if free < needed else ', another rank less'}. Free space, lower train.keep_last, or set "
            "output_dir to a larger file system"
        )
