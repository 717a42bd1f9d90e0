"""Per-rank log of the samples each micro-batch used (``train.log_samples=true``, for audits and tests).

``<run_dir>/samples/rank_<r>.jsonl`` gets one line per micro-step:
``{"step": 3, "micro": 0, "uids": [...], "skipped": [...]}`` (``skipped``: over-long samples left
out with ``data.overlong=skip``). On resume, lines after the checkpoint's step are dropped, so the
files read like those of an uninterrupted run: every sample appears exactly once per epoch. Rank 0
also cuts back (or, on a fresh start, deletes) the files of ranks this run does not have: a run
resumed on fewer ranks keeps the lines those ranks wrote up to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from arra_ds.io import append_jsonl, read_jsonl, truncate_jsonl_after


def _rank_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


class SampleLog:
    def __init__(self, run_dir: str | Path, rank: int, enabled: bool, resume_step: int | None, world_size: int = 1):
        self.enabled = enabled
        self.path = Path(run_dir) / "samples" / f"rank_{rank:05d}.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = [self.path]
        if rank == 0:
            mine += [p for p in self.path.parent.glob("rank_*.jsonl") if _rank_of(p) >= world_size]
        for path in mine:
            if resume_step is None:
                path.unlink(missing_ok=True)
            else:
                truncate_jsonl_after(path, resume_step)

    def log(self, step: int, micro: int, uids: list[str], skipped: list[str]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, {"step": step, "micro": micro, "uids": uids, "skipped": skipped})


def read_sample_logs(run_dir: str | Path) -> dict[int, list[dict]]:
    """rank -> its lines, for tests and audits."""
    logs = {}
    for path in sorted((Path(run_dir) / "samples").glob("rank_*.jsonl")):
        logs[_rank_of(path)] = read_jsonl(path)
    return logs
