"""Everything that knows about DeepSpeed: config filling, model construction under ZeRO-3,
the engine wrapper the training loop drives, and checkpoint save/load.

Model code stays single-device; this module supplies the ZeRO-3 pieces it needs:
``HfDeepSpeedConfig`` kept alive while the backbone is built (so ``transformers`` constructs it inside
``zero.Init`` and no rank materialises the full model) and ``GatheredParameters`` for the few
weight edits that need a whole tensor.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
from pathlib import Path
from typing import Any, ContextManager, Iterable

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from arra_ds import distributed
from arra_ds.errors import UserError
from arra_ds.model.arra import AlignConfig, ARRAModel, ARRAOutput, build_model
from arra_ds.model.backbone import ModelConfig, no_gather
from arra_ds.train.run_config import TrainConfig
from arra_ds.train.optim import OptimConfig, param_groups

AUTO = "auto"


class DSConfigError(UserError, ValueError):
    """The DeepSpeed JSON contradicts the run config; the message names both values."""


def init_distributed() -> None:
    """Start the process group (``arra_ds.distributed``: also without a launcher) and hand it to DeepSpeed."""
    if not torch.cuda.is_available():
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (minutes on first use) and maps a
        # 69 MB /dev/shm buffer per rank that it never unlinks; only inference_all_reduce uses it, and
        # training collectives go through gloo. Skipping it keeps /dev/shm from filling up run by run.
        # (import_module: the package attribute deepspeed.comm.torch is the torch module itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    distributed.init_process_group(even_alone=True)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator counts its devices as the LOCAL_SIZE that its own launcher exports;
        # without it (python launch/train.py, torchrun) it runs `numactl --hardware` in a subprocess at
        # every gradient reduce-scatter (~44 forks per step of the demo run).
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DSConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e


def _fill(section: dict, key: str, value: Any, where: str, source: str) -> None:
    """Set ``section[key]`` when it is "auto" or absent; refuse a contradicting explicit value."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float)) and abs(current - value) <= 1e-12 * max(1.0, abs(value))):
        raise DSConfigError(
            f"ds_config {where}.{key}={current!r} contradicts the run config ({source}={value!r}); "
            f'set it to "auto" in the ds_config so the run config decides'
        )


def fill_ds_config(ds_config: dict, train: TrainConfig, optim: OptimConfig, world_size: int, hidden_size: int) -> dict:
    """Fill the "auto" fields of a DeepSpeed JSON from the run config (the one place that does).

    Batch sizes, gradient clipping, precision, optimizer hyper-parameters and the ZeRO-3 bucket
    sizes (scaled with the hidden size, as Hugging Face's integration does).
    """
    ds = copy.deepcopy(ds_config)
    micro = train.micro_batch_size
    accum = train.grad_accum_steps(world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "", "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "", "train.global_batch_size / (micro_batch_size * world)")
    _fill(ds, "train_batch_size", micro * accum * world_size, "", "train.global_batch_size")
    _fill(ds, "gradient_clipping", float(optim.grad_clip), "", "optim.grad_clip")

    dtype = distributed.compute_dtype(train.precision)
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", dtype == torch.bfloat16, "bf16", "train.precision")
    if ds.get("fp16", {}).get("enabled") not in (None, False, AUTO):
        raise DSConfigError("fp16 is not supported (Chameleon trains in bf16); set fp16.enabled=false, use bf16")
    ds.setdefault("fp16", {})["enabled"] = False
    if "scheduler" in ds:
        raise DSConfigError(
            "ds_config has a 'scheduler' section, but the learning rate is driven by optim.* of the run "
            "config (optim.schedule, optim.warmup_steps); remove 'scheduler' from the ds_config"
        )

    if "optimizer" not in ds:
        raise DSConfigError(
            "ds_config has no 'optimizer' section, so DeepSpeed would build no optimizer and nothing would train; "
            'add {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", '
            '"weight_decay": "auto"}}} (optim.* of the run config fills it)'
        )
    if str(ds["optimizer"].get("type", "")).lower() not in ("adam", "adamw"):
        raise DSConfigError(
            f"ds_config optimizer.type={ds['optimizer'].get('type')!r} contradicts the run config: optim.* describes "
            'AdamW (lr, betas, eps, decoupled weight_decay); use "type": "AdamW"'
        )
    if ds["optimizer"].get("params", {}).get("adam_w_mode") is False:
        raise DSConfigError(
            "ds_config optimizer.params.adam_w_mode=false turns decoupled weight decay into L2 regularisation, "
            "which optim.weight_decay does not describe; remove adam_w_mode"
        )
    params = ds["optimizer"].setdefault("params", {})
    _fill(params, "lr", float(optim.lr), "optimizer.params", "optim.lr")
    _fill(params, "betas", [float(b) for b in optim.betas], "optimizer.params", "optim.betas")
    _fill(params, "eps", float(optim.eps), "optimizer.params", "optim.eps")
    _fill(params, "weight_decay", float(optim.weight_decay), "optimizer.params", "optim.weight_decay")

    zero = ds.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(ds) if v == AUTO]
    if leftover:
        raise DSConfigError(f'ds_config fields left at "auto" that arra_ds does not fill: {leftover}; give them values')
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _gather_for_edit(params):
    """ZeRO-3: the full tensors of ``params`` on every rank; rank 0's edits are kept on exit."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)


class Engine:
    """The DeepSpeed engine behind a small interface the loop needs (forward/backward/step/save)."""

    def __init__(self, model_cfg: ModelConfig, align_cfg: AlignConfig, optim_cfg: OptimConfig, ds_config: dict):
        self.ds_config = ds_config
        self.precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        zero3 = zero_stage(ds_config) == 3
        # Must stay referenced while the model is built: transformers reads it through a weakref.
        hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
        model = build_model(model_cfg, align_cfg, dtype=dtype, gather=_gather_for_edit if zero3 else no_gather)
        del hf_ds_config

        groups = param_groups(model, optim_cfg.weight_decay)
        optimizer = None
        # On CPU without offload DeepSpeed would JIT-compile its C++ Adam; torch's AdamW is the same
        # update and needs no compiler. With a GPU (FusedAdam) or ZeRO-Offload (CPUAdam) DeepSpeed builds it.
        if "optimizer" in ds_config and not torch.cuda.is_available() and not _offloads_optimizer(ds_config):
            params = ds_config["optimizer"]["params"]
            ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
            ds_config["zero_allow_untested_optimizer"] = True
            optimizer = torch.optim.AdamW(groups, lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            config=ds_config,
        )
        self.model: ARRAModel = self.engine.module
        self.device = self.engine.device

    # ---- training step ------------------------------------------------------------------------
    def forward(self, batch: dict) -> ARRAOutput:
        # tensors only: batch["meta"] (uids, skip counts) stays on the host
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def at_accumulation_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def train(self) -> None:
        self.engine.train()

    def gathered_for_reading(self, params: Iterable[torch.nn.Parameter]) -> ContextManager:
        """Context in which ``params`` hold their full values on every rank (read-only: changes are
        dropped on exit). Under ZeRO-3 a collective, so every rank must enter it for the same params;
        below ZeRO-3 parameters are whole already. Used to copy weights into an inference model."""
        if zero_stage(self.ds_config) != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    # ---- checkpoints (layout, atomic commit and verification: arra_ds/train/checkpoint.py) -------
    def save(self, ckpt_root: str | Path, tag: str) -> None:
        """Every rank writes its partition into ``ckpt_root/tag``; ``latest`` is the caller's job."""
        self.engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)

    def load(self, ckpt_root: str | Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_root), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no model states for {Path(ckpt_root) / tag}")

    def num_parameters(self) -> int:
        return self.model.num_parameters()
