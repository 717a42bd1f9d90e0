"""Streaming's shared memory on a host: one process at a time claims a prefix, and what a crashed
``StreamingDataset`` left in ``/dev/shm`` is removed.

Claiming a prefix. A ``StreamingDataset`` names its shared memory ``<prefix:06d>_<name>``, and
``streaming.base.shared.prefix.get_shm_prefix`` picks the prefix by scanning for the lowest one whose
``<prefix>_locals`` block does not exist yet, then creates that block (``create=True``). Scan and create
are two steps with nothing between them across processes: two jobs on one host that build their
datasets at the same moment (the study's parallel trainings and evaluations, two users' runs, a
test next to a run) both find the same free prefix, and the later ``create`` fails with
``FileExistsError: '/000000_locals'``. Within one job the local ranks also scan on their own, so a
prefix taken by another job between their scans makes them disagree ("shared memory registered does
not match"). ``serialise_prefix_claims`` wraps streaming's ``get_shm_prefix`` so that the local leader
of each job holds a host-wide lock (``prefix_lock``, an flock on a file in ``/dev/shm`` itself) from
before any local rank scans until its ``<prefix>_locals`` block exists; the other ranks scan after a
barrier, inside that window. Every arra_ds process installs it before building a dataset
(``arra_ds.data.loader.ensure_streaming_env``).

Removing stale blocks. A ``StreamingDataset`` registers its local cache directory and its epoch/shard
state in shared memory blocks named ``<prefix:06d>_<name>`` (``streaming.base.constant.SHM_TO_CLEAN``) and removes
them when it exits normally. A run killed with SIGKILL (OOM killer, node failure, Slurm after
KillWait) leaves them behind; the next run on that node that uses the same local directory with a
remote source then fails with "Reused local directory", and the blocks hold memory until reboot.

``streaming.base.util.clean_stale_shared_memory`` removes *every* such block on the host, including
those of other jobs sharing the node (or other test processes). This module removes only blocks
that no live process has mapped or open, which is what "stale" means.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import time
from pathlib import Path
from tempfile import gettempdir
from typing import Iterator

import streaming.base.dataset as streaming_dataset
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
from streaming.base.shared.prefix import get_shm_prefix as streaming_get_shm_prefix

from arra_ds import distributed

SHM_DIR = Path("/dev/shm")
_STREAMING_SHM = re.compile(r"^(\d{6})_(%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))
# The lock lives in the shared memory it guards: its scope is exactly the prefix space's. Two "nodes"
# on one host with private /dev/shm mounts (scripts/slurm_cluster.sh) but one /tmp hold different
# locks; one in /tmp would make a job's second node leader wait for its first, which waits for it at
# streaming's barrier. The temp dir only where there is no /dev/shm.
PREFIX_LOCK_FILE = "arra_ds_streaming_prefix.lock"
# A leader holds the lock across its job's barriers: a job whose other ranks are slow to arrive holds it
# that long. Past this wait the claim goes ahead unlocked (streaming's own behaviour), so two multi-node
# jobs sharing nodes can never deadlock on it.
PREFIX_LOCK_WAIT_S = 300.0
PREFIX_LOCK_POLL_S = 0.05


@contextlib.contextmanager
def prefix_lock(wait_s: float = PREFIX_LOCK_WAIT_S) -> Iterator[None]:
    """Host-wide exclusive lock of the streaming prefix space (claims and stale-block removal)."""
    path = (SHM_DIR if SHM_DIR.is_dir() else Path(gettempdir())) / PREFIX_LOCK_FILE
    try:
        handle = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor: any user's file will do
    except FileNotFoundError:
        handle = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"waited {wait_s:.0f} s for {path} (held by another job's dataset start); going on without it",
                          file=sys.stderr, flush=True)
                    break
                time.sleep(PREFIX_LOCK_POLL_S)
        yield
    finally:
        os.close(handle)  # releases the lock


def serialised_get_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
    """streaming's ``get_shm_prefix`` with the claim serialised across the host (see the module docstring)."""
    with prefix_lock() if world.is_local_leader else contextlib.nullcontext():
        distributed.barrier()  # the other local ranks scan only once their leader holds the lock
        return streaming_get_shm_prefix(streams_local, streams_remote, world, retry)


def serialise_prefix_claims() -> None:
    """Make every ``StreamingDataset`` of this process claim its prefix under ``prefix_lock`` (idempotent)."""
    streaming_dataset.get_shm_prefix = serialised_get_shm_prefix


def streaming_shm_blocks(shm_dir: Path = SHM_DIR) -> list[str]:
    """Names of the streaming shared-memory blocks that exist now."""
    if not shm_dir.is_dir():
        return []
    return sorted(p.name for p in shm_dir.iterdir() if _STREAMING_SHM.match(p.name))


def _blocks_in_use(shm_dir: Path) -> set[str]:
    """Names under ``shm_dir`` that some process we can inspect has mapped or open."""
    prefix = str(shm_dir) + "/"
    in_use: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            with open(proc / "maps") as maps:
                for line in maps:
                    at = line.find(prefix)
                    if at >= 0:
                        in_use.add(line[at + len(prefix) :].split()[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    in_use.add(target[len(prefix) :].split()[0])
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # the process exited while we looked
        except PermissionError:
            # Another user's process: we cannot see what it uses, and could not remove its blocks.
            continue
    return in_use


def clean_stale_streaming_shm(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove streaming blocks that no live process uses; returns the removed names.

    Call once per node (local rank 0) before any ``StreamingDataset`` is built, while the other
    local ranks wait at a barrier. Blocks owned by other users are left alone (we could neither
    tell whether they are in use nor remove them). Runs under ``prefix_lock``: a prefix another job
    is claiming right now is never half-seen (its block, not yet its filelocks).
    """
    with prefix_lock():
        return _clean_stale_streaming_shm(shm_dir)


def _clean_stale_streaming_shm(shm_dir: Path) -> list[str]:
    candidates = streaming_shm_blocks(shm_dir)
    if not candidates:
        return []
    in_use = _blocks_in_use(shm_dir)
    my_uid = os.getuid()
    removed = []
    for name in candidates:
        path = shm_dir / name
        if name in in_use:
            continue
        try:
            if path.stat().st_uid != my_uid:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    _remove_orphaned_filelocks(shm_dir, in_use)
    return removed


def _remove_orphaned_filelocks(shm_dir: Path, in_use: set[str]) -> None:
    """Filelocks of prefixes that no longer have any shared memory (their dataset is gone).

    The filelocks live in the temp dir, which can be wider than ``shm_dir``: a prefix some process
    maps in another mount's ``/dev/shm`` (another "node" on this host) keeps its filelocks.
    """
    live_blocks = set(streaming_shm_blocks(shm_dir)) | {name for name in in_use if _STREAMING_SHM.match(name)}
    live_prefixes = {_STREAMING_SHM.match(name).group(1) for name in live_blocks}
    tmp = Path(gettempdir())
    pattern = re.compile(r"^(\d{6})_(%s|%s)$" % (BARRIER_FILELOCK, CACHE_FILELOCK))
    for path in tmp.iterdir():
        match = pattern.match(path.name)
        if match and match.group(1) not in live_prefixes:
            try:
                if path.stat().st_uid == os.getuid():
                    path.unlink()
            except FileNotFoundError:
                continue
