"""Removing the shared memory that a crashed ``StreamingDataset`` left in ``/dev/shm``.

A ``StreamingDataset`` registers its local cache directory and its epoch/shard state in shared
memory blocks named ``<prefix:06d>_<name>`` (``streaming.base.constant.SHM_TO_CLEAN``) and removes
them when it exits normally. A run killed with SIGKILL (OOM killer, node failure, Slurm after
KillWait) leaves them behind; the next run on that node that uses the same local directory with a
remote source then fails with "Reused local directory", and the blocks hold memory until reboot.

``streaming.base.util.clean_stale_shared_memory`` removes *every* such block on the host, including
those of other jobs sharing the node (or other test processes). This module removes only blocks
that no live process has mapped or open, which is what "stale" means.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from tempfile import gettempdir

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

SHM_DIR = Path("/dev/shm")
_STREAMING_SHM = re.compile(r"^(\d{6})_(%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))


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
    tell whether they are in use nor remove them).
    """
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
    _remove_orphaned_filelocks(shm_dir)
    return removed


def _remove_orphaned_filelocks(shm_dir: Path) -> None:
    """Filelocks of prefixes that no longer have any shared memory (their dataset is gone)."""
    live_prefixes = {_STREAMING_SHM.match(name).group(1) for name in streaming_shm_blocks(shm_dir)}
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
