"""Per-rank log of the samples each micro-batch used (``train.log_samples=true``, for audits and tests).

``<run_dir>/samples/rank_<r>.jsonl`` gets one line per micro-step:
``{"step": 3, "micro": 0, "uids": [...], "skipped": [...]}`` (``skipped``: over-long samples left
out with ``data.overlong=skip``). On resume, lines after the checkpoint's step are dropped, so the
files read like those of an uninterrupted run: every sample appears exactly once per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path


class SampleLog:
    def __init__(self, run_dir: str | Path, rank: int, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(run_dir) / "samples" / f"rank_{rank:05d}.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def log(self, step: int, micro: int, uids: list[str], skipped: list[str]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "uids": uids, "skipped": skipped}) + "\n")


def read_sample_logs(run_dir: str | Path) -> dict[int, list[dict]]:
    """rank -> its lines, for tests and audits."""
    logs = {}
    for path in sorted((Path(run_dir) / "samples").glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        logs[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return logs
