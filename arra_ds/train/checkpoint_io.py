"""Reading the trainer's DeepSpeed checkpoints outside DeepSpeed (generation, evaluation, export).

A checkpoint is ``<run_dir>/checkpoints/<tag>/`` (tag ``step_<n>``), written by ``Engine.save``;
``<run_dir>/checkpoints/latest`` names the newest tag and ``<run_dir>/config.yaml`` is the resolved
run config. Under ZeRO-3 each rank saved a shard of the flat fp32 master weights;
``deepspeed.utils.zero_to_fp32`` reassembles them offline (no process group, no engine). This module
is, besides ``engine.py``, the only place that imports deepspeed, and only that offline reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
RUN_CONFIG_FILE = "config.yaml"
_STEP_TAG = re.compile(r"^step_(\d+)$")


class CheckpointNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the directory holding tag directories and ``latest``
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def run_dir(self) -> Path:
        return self.root.parent if self.root.name == CHECKPOINTS_DIR else self.root

    @property
    def step(self) -> int | None:
        match = _STEP_TAG.match(self.tag)
        return int(match.group(1)) if match else None

    @property
    def run_config_path(self) -> Path:
        return self.run_dir / RUN_CONFIG_FILE


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def _read_latest(root: Path) -> str:
    tag = (root / LATEST_FILE).read_text().strip()
    if not tag:
        raise CheckpointNotFoundError(f"{root / LATEST_FILE} is empty")
    return tag


def is_trainer_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CHECKPOINTS_DIR / LATEST_FILE).is_file() or (path / LATEST_FILE).is_file() or _is_tag_dir(path)


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run directory, its ``checkpoints`` directory (both: the latest tag) or one tag directory."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR / LATEST_FILE).is_file():
        root = path / CHECKPOINTS_DIR
        ref = CheckpointRef(root, _read_latest(root))
    elif (path / LATEST_FILE).is_file():
        ref = CheckpointRef(path, _read_latest(path))
    elif _is_tag_dir(path):
        ref = CheckpointRef(path.parent, path.name)
    else:
        raise CheckpointNotFoundError(
            f"{path} is not a trainer checkpoint: expected a run directory (with checkpoints/latest), a "
            "checkpoints directory (with latest) or a tag directory (step_<n>/ with *model_states.pt files)"
        )
    if not _is_tag_dir(ref.path):
        raise CheckpointNotFoundError(f"checkpoint {ref.path} has no *model_states.pt files (incomplete save?)")
    return ref


def consolidated_state_dict(ref: CheckpointRef, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a ZeRO-2/3 checkpoint (names as in ``ARRAModel``).

    Tensors are materialised one at a time (lazy mode) and cast to ``dtype`` when given, so peak host
    memory is one fp32 tensor plus the result, not a full fp32 copy of the model.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
    state = {}
    for name in list(lazy):
        tensor = lazy.pop(name).contiguous()
        state[name] = tensor.to(dtype) if dtype is not None else tensor
    return state
