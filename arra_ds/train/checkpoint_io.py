"""Reading the trainer's DeepSpeed checkpoints outside DeepSpeed (export, generation, evaluation).

A checkpoint is ``<run_dir>/checkpoints/<tag>/`` (tag ``step_<n>``), written atomically by
``arra_ds.train.checkpoint``; ``<run_dir>/checkpoints/latest`` names the newest complete tag and
``<run_dir>/config.yaml`` is the resolved run config. Under ZeRO-3 each rank saved a shard of the
flat fp32 master weights; ``deepspeed.utils.zero_to_fp32`` reassembles them offline (no process
group, no engine). Besides ``engine.py`` this is the only module that imports deepspeed, and only
that offline reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from arra_ds.train import checkpoint as ckpt

CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.yaml"


class CheckpointNotFoundError(ckpt.CheckpointError, FileNotFoundError):
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
    def step(self) -> int:
        return int(ckpt.read_manifest(self.path)["step"])

    @property
    def run_config_path(self) -> Path:
        return self.run_dir / RUN_CONFIG_FILE


def is_trainer_checkpoint(path: str | Path) -> bool:
    """Is ``path`` a run directory, checkpoints directory or tag directory written by the trainer?"""
    path = Path(path)
    has_latest = any(ckpt.read_latest(root) is not None for root in (path / CHECKPOINTS_DIR, path))
    return has_latest or (path / ckpt.MANIFEST).is_file()


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run directory, its ``checkpoints`` directory (both: the latest tag) or one tag directory.

    The checkpoint's manifest is verified (every file present with its recorded size).
    """
    path = Path(path)
    for root in (path / CHECKPOINTS_DIR, path):
        tag = ckpt.read_latest(root)
        if tag is not None:
            ref = CheckpointRef(root, tag)
            break
    else:
        if not (path / ckpt.MANIFEST).is_file():
            raise CheckpointNotFoundError(
                f"{path} is not a trainer checkpoint: expected a run directory (with checkpoints/latest), a "
                f"checkpoints directory (with latest) or a tag directory (step_<n>/ with {ckpt.MANIFEST})"
            )
        ref = CheckpointRef(path.parent, path.name)
    ckpt.verify(ref.path)
    return ref


def consolidated_state_dict(ref: CheckpointRef, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a ZeRO-2/3 checkpoint (names as in ``ARRAModel``).

    Tensors are materialised one at a time (lazy mode) and cast to ``dtype`` when given, so peak host
    memory is one fp32 tensor plus the result, not a full fp32 copy of the model. The files' sizes and
    zip CRCs are checked first: a corrupt file is named instead of loading wrong weights.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt.check_contents(ref.path, ckpt.verify(ref.path))
    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
        state = {}
        for name in list(lazy):
            tensor = lazy.pop(name).contiguous()
            state[name] = tensor.to(dtype) if dtype is not None else tensor
    except Exception as e:  # zero_to_fp32's own errors do not always name the checkpoint
        raise ckpt.CheckpointError(f"cannot read the weights of checkpoint {ref.path}: {type(e).__name__}: {e}") from e
    return state
