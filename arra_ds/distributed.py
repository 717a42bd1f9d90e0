"""Ranks, the process group, devices, precisions, and the few collectives the library uses.

Launchers (deepspeed, torchrun, srun) export RANK / WORLD_SIZE / LOCAL_RANK before Python starts,
so the rank helpers read the environment first and only fall back to ``torch.distributed``; they
work with and without an initialised process group.

``init_process_group`` is the one place that starts the group (gloo on CPU, nccl on GPU), for
training, generation and evaluation alike. For training started without a launcher
(``python launch/train.py``) it forms a group of one on a free port, so no MPI discovery or port
clash can get in the way.

Work split of generation and evaluation: *chunks* of consecutive global indices (one batch each);
chunk c goes to rank c % world. A chunk holds the same samples whatever the world size, so every
batch, and every number computed from it, is the same with 1 rank or 8.
"""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist

from arra_ds.errors import ConfigError, UserError

DEFAULT_MASTER_PORT = 29500  # torchrun's and DeepSpeed's default rendezvous port
PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PortInUseError(UserError):
    """The rendezvous port is taken (usually by another run on the same machine)."""


# ---- ranks ----------------------------------------------------------------------------------------


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    if is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_initialized():
        return tdist.get_world_size()
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
        tdist.barrier()


# ---- devices and precision ------------------------------------------------------------------------


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def compute_dtype(precision: str, on_device: torch.device | None = None) -> torch.dtype:
    """Weights / activations dtype for ``precision`` (auto | bf16 | fp32) on ``on_device``.

    auto is bf16 on a GPU and fp32 on the CPU; bf16 on the CPU is refused (slow, and DeepSpeed's CPU
    path and our kernels are not built for it): the one rule for training, generation, evaluation
    and pre-tokenization.
    """
    on_device = on_device or device()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if on_device.type == "cuda" else torch.float32
    if precision == "bf16" and on_device.type != "cuda":
        raise ConfigError(f"precision=bf16 needs a GPU (the device is {on_device}); on the CPU use fp32 or auto")
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ---- process group --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A group of one when no launcher set the rendezvous variables (``python launch/train.py``)."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_process_group(timeout_minutes: int = 60, even_alone: bool = False) -> torch.device:
    """Join the launcher's process group; returns this rank's device.

    A single process (no launcher, or WORLD_SIZE=1) forms a group of one only with ``even_alone``
    (DeepSpeed needs one; generation and evaluation do not). A taken rendezvous port becomes a
    ``PortInUseError`` that says which port and how to pick another.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if is_initialized() or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and not even_alone):
        return device()
    _single_process_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        tdist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    except tdist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)
        raise PortInUseError(
            f"port {port} on {os.environ.get('MASTER_ADDR', 'localhost')} is already in use (another run on this "
            f"machine?); start this one on a free port: deepspeed --master_port <port> ... or torchrun "
            f"--master_port <port> ..."
        ) from None
    return device()


def destroy_process_group() -> None:
    if is_initialized():
        tdist.destroy_process_group()


# ---- seeding --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(base: int) -> int:
    """A per-rank seed (base * world + rank): distinct across ranks, reproducible for a given layout."""
    return base * world_size() + rank()


# ---- collectives ----------------------------------------------------------------------------------


def collective_device() -> torch.device:
    """Where tensors must live for the group's collectives (NCCL reduces CUDA tensors only)."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a small tensor over ranks (a new tensor; the input is left alone)."""
    if not is_initialized() or world_size() == 1:
        return values
    values = values.clone()
    tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over ranks (used for logging, not for gradients)."""
    return all_reduce_sum(values) / world_size() if is_initialized() else values


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    tensor = torch.tensor([float(flag)], dtype=torch.float64, device=collective_device())
    return bool(all_reduce_sum(tensor)[0] > 0)


def sum_over_ranks(values: list[int]) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=collective_device())
    return [int(v) for v in all_reduce_sum(tensor).cpu().tolist()]


def chunk_ranges(total: int, chunk_size: int) -> list[range]:
    return [range(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def my_chunks(total: int, chunk_size: int) -> list[range]:
    """The chunks of ``range(total)`` this rank owns (chunk c -> rank c % world)."""
    return chunk_ranges(total, chunk_size)[rank() :: world_size()]


def gather_rows(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, row) pairs, sorted by index, on every rank.

    indices [n] int64, values [n, ...] float64 -> ([N], [N, ...]) with N the sum over ranks.
    """
    indices = np.asarray(indices, np.int64)
    values = np.asarray(values, np.float64)
    if not is_initialized() or world_size() == 1:
        order = np.argsort(indices, kind="stable")
        return indices[order], values[order]
    on = collective_device()
    world = world_size()
    row_shape = values.shape[1:]
    count = torch.tensor([len(indices)], dtype=torch.int64, device=on)
    counts = [torch.zeros_like(count) for _ in range(world)]
    tdist.all_gather(counts, count)
    longest = max(int(c.item()) for c in counts)
    padded_idx = torch.full((longest,), -1, dtype=torch.int64, device=on)
    padded_idx[: len(indices)] = torch.from_numpy(indices)
    padded_val = torch.zeros((longest, *row_shape), dtype=torch.float64, device=on)
    padded_val[: len(indices)] = torch.from_numpy(values)
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    all_val = [torch.empty_like(padded_val) for _ in range(world)]
    tdist.all_gather(all_idx, padded_idx)
    tdist.all_gather(all_val, padded_val)
    idx = np.concatenate([a[: int(c.item())].cpu().numpy() for a, c in zip(all_idx, counts)])
    val = np.concatenate([v[: int(c.item())].cpu().numpy() for v, c in zip(all_val, counts)])
    order = np.argsort(idx, kind="stable")
    return idx[order], val[order]
