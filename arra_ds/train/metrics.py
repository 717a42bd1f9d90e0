"""Run metrics: one JSON line per logged step in metrics.jsonl, the same scalars in tensorboard."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from arra_ds.io import append_jsonl, truncate_jsonl_after


class MetricsLogger:
    """Rank-0 writer of ``metrics.jsonl`` and ``tensorboard/``; other ranks get a no-op logger."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            # drop lines logged after the checkpoint so the file reads like an uninterrupted run
            truncate_jsonl_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh file
        if tensorboard:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, {"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(TENSORBOARD_NAMES.get(key, key), value, step)

    def add_image(self, tag: str, image_chw, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


TENSORBOARD_NAMES = {
    "loss": "loss/total",
    "loss_ar": "loss/ar",
    "loss_gva": "loss/gva",
    "loss_z": "loss/z",
    "cos": "align/cos",
    "cos_first": "align/cos_first",
    "align_weight": "align/weight",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "samples_seen": "data/samples_seen",
}
