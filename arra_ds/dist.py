"""Rank/world helpers that work with and without an initialised process group.

Launchers (deepspeed, torchrun, srun) export RANK/WORLD_SIZE/LOCAL_RANK before Python starts, so
these helpers read the environment first and only fall back to torch.distributed.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over ranks (used for logging, not for gradients)."""
    if not is_initialized() or world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(base: int) -> int:
    """A per-rank seed (base * world + rank): distinct across ranks, reproducible for a given layout."""
    return base * world_size() + rank()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")
