"""Optimizer settings, parameter groups and the learning-rate schedule.

The schedule is a pure function of the step, set on the optimizer before every update, so a
resumed run follows exactly the same curve without restoring any scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from arra_ds.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    # parameters that get weight decay: matrices (norms, biases and other 1-D parameters get none) or all
    # (the ARRA reference: torch AdamW over model.parameters() with one weight_decay)
    decay_params: Literal["matrices", "all"] = "matrices"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "constant", "linear"] = "cosine"  # shape after warmup
    warmup_steps: int = 0
    # warm-up in epochs of the training data instead of steps (the reference: 0.01); the trainer turns it
    # into round(warmup_epochs * steps per epoch) steps, steps per epoch = data set size // global batch
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.1  # final lr / lr for cosine and linear
    # optimizer master weights, gradients and AdamW states: fp32 (DeepSpeed's bf16 mode keeps fp32 master
    # copies; the sound default) or bf16 (DeepSpeed's bf16_master_weights_and_grads + bf16_optimizer_states:
    # the reference's bf16 parameters and AdamW states, for exact reproduction; needs bf16 and ZeRO >= 1)
    master_weights: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ConfigError("optim.weight_decay, optim.grad_clip, optim.warmup_steps and optim.warmup_epochs must be >= 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps} and optim.warmup_epochs={self.warmup_epochs} both set; "
                "give the warm-up in one of them and set the other to 0"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    def resolved_warmup_steps(self, steps_per_epoch: int) -> int:
        """Warm-up length in optimizer steps: ``warmup_steps``, or ``warmup_epochs`` of ``steps_per_epoch``
        (at least 1 step when warmup_epochs > 0)."""
        if self.warmup_epochs:
            return max(1, round(self.warmup_epochs * steps_per_epoch))
        return self.warmup_steps


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps that see ``num_samples`` once at ``global_batch_size`` samples per step (>= 1)."""
    return max(1, num_samples // global_batch_size)


def lr_at(step: int, max_steps: int, cfg: OptimConfig, epoch_steps: int = 0) -> float:
    """Learning rate for optimizer update number ``step`` (0-based): linear warmup, then the schedule.

    ``epoch_steps``: optimizer steps per epoch of the data (``steps_per_epoch``); only read when the
    warm-up is given in epochs (``optim.warmup_epochs``).
    """
    if cfg.warmup_epochs and epoch_steps < 1:
        raise ValueError("optim.warmup_epochs needs the steps per epoch of the data (epoch_steps)")
    warmup = cfg.resolved_warmup_steps(epoch_steps)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(max_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_params: str = "matrices") -> list[dict]:
    """AdamW parameter groups. ``decay_params="matrices"``: norms, biases and other 1-D parameters get
    no weight decay; ``"all"``: one group, every trainable parameter decayed (the ARRA reference)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decay_params == "all":
        return [{"params": trainable, "weight_decay": weight_decay}]
    if decay_params != "matrices":
        raise ValueError(f"unknown optim.decay_params {decay_params!r}")
    decay, no_decay = [], []
    for param in trainable:
        # under ZeRO-3 a partitioned parameter's .dim() is 1; ds_shape holds the real shape
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
