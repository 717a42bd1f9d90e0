"""Process group, work split and collectives of generation and evaluation (torchrun / srun; gloo on
CPU, nccl on GPU).

Work is split in *chunks* of consecutive global indices (one generation or feature batch each) and
chunk c goes to rank c % world. A chunk holds the same samples whatever the world size, so every
batch, and therefore every number computed from it, is the same with 1 rank or 8.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist

from arra_ds import dist


def init_from_env(timeout_minutes: int = 60) -> torch.device:
    """Join the launcher's process group when WORLD_SIZE > 1; return this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.device()


def chunk_ranges(total: int, chunk_size: int) -> list[range]:
    return [range(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def my_chunks(total: int, chunk_size: int) -> list[range]:
    """The chunks of ``range(total)`` this rank owns (chunk c -> rank c % world)."""
    return chunk_ranges(total, chunk_size)[dist.rank() :: dist.world_size()]


def _collective_device() -> torch.device:
    if dist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, row) pairs, sorted by index, on every rank.

    indices [n] int64, values [n, ...] float64 -> ([N], [N, ...]) with N the sum over ranks.
    """
    indices = np.asarray(indices, np.int64)
    values = np.asarray(values, np.float64)
    if not dist.is_initialized() or dist.world_size() == 1:
        order = np.argsort(indices, kind="stable")
        return indices[order], values[order]
    device = _collective_device()
    world = dist.world_size()
    row_shape = values.shape[1:]
    count = torch.tensor([len(indices)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    tdist.all_gather(counts, count)
    longest = max(int(c.item()) for c in counts)
    padded_idx = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded_idx[: len(indices)] = torch.from_numpy(indices)
    padded_val = torch.zeros((longest, *row_shape), dtype=torch.float64, device=device)
    padded_val[: len(indices)] = torch.from_numpy(values)
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    all_val = [torch.empty_like(padded_val) for _ in range(world)]
    tdist.all_gather(all_idx, padded_idx)
    tdist.all_gather(all_val, padded_val)
    idx = np.concatenate([a[: int(c.item())].cpu().numpy() for a, c in zip(all_idx, counts)])
    val = np.concatenate([v[: int(c.item())].cpu().numpy() for v, c in zip(all_val, counts)])
    order = np.argsort(idx, kind="stable")
    return idx[order], val[order]


def sum_over_ranks(values: list[int]) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    if dist.is_initialized() and dist.world_size() > 1:
        tdist.all_reduce(tensor)
    return [int(v) for v in tensor.cpu().tolist()]
