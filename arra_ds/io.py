"""Atomic and durable file writes, and the JSONL logs that resumed runs cut back to their checkpoint.

Every file another process (a resumed run, a reader on another node, a user) may read while it is
being written goes through ``atomic_write``: the bytes go to a temporary file next to the target
(unique per host and process, so ranks never share one) and are renamed over it, so a reader sees
the old file or the new one, never half of one. ``durable=True`` also fsyncs the file and its
directory (checkpoints: survives a power loss, not only a crash).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Iterable


def temporary_sibling(path: Path) -> Path:
    """A name next to ``path`` that no other process writes (host and pid in it)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (what this node wrote reaches the disk)."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def atomic_write(path: str | Path, data: bytes | str, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling + rename; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, value: Any, durable: bool = False) -> Path:
    return atomic_write(path, json.dumps(value, indent=1) + "\n", durable)


def read_json(path: str | Path, error: type[Exception] = ValueError, expect: type = dict, hint: str = "") -> Any:
    """The JSON value in ``path``. ``error`` (the caller's domain error) names the file when it is missing,
    is not valid JSON or does not hold an ``expect`` (default: an object); ``hint`` (what the file is, what to
    do) ends the message."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{path} does not exist{suffix}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}){suffix}") from e
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise error(f"{path} must hold {kind}, found {type(value).__name__}{suffix}")
    return value


def append_jsonl(path: str | Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl_after(path: str | Path, step: int, key: str = "step") -> None:
    """Drop the lines whose ``key`` is above ``step`` (a resumed run continues where its checkpoint
    was taken, so its log reads like the uninterrupted run's)."""
    path = Path(path)
    if not path.exists():
        return
    kept: Iterable[dict] = (record for record in read_jsonl(path) if record[key] <= step)
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in kept))
