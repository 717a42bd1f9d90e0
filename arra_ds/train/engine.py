"""Everything that knows about DeepSpeed: config filling, model construction under ZeRO-3,
the engine wrapper the training loop drives, and checkpoint save/load.

Model code stays single-device; this module supplies the ZeRO-3 pieces it needs:
``HfDeepSpeedConfig`` kept alive while the backbone is built (so ``transformers`` constructs it inside
``zero.Init`` and no rank materialises the full model), ``zero.Init`` itself for a plain ``nn.Module``
backbone (LlamaGen; model code enters it through the ``partitioned`` hook) and ``GatheredParameters``
for the few weight edits that need a whole tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
from pathlib import Path
from typing import Any, ContextManager, Iterable

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal
from transformers.integrations import HfDeepSpeedConfig

from arra_ds import distributed
from arra_ds.errors import UserError
from arra_ds.model.arra import AlignConfig, ARRAModel, ARRAOutput, build_model
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import no_gather, no_partitioning
from arra_ds.train.optim import OptimConfig, param_groups
from arra_ds.train.run_config import TrainConfig

AUTO = "auto"
# ds_config["checkpoint"][LOAD_UNIVERSAL_KEY]: DeepSpeed's switch for loading a universal checkpoint.
LOAD_UNIVERSAL_KEY = "load_universal"


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
    bf16_master = optim.master_weights == "bf16"
    if bf16_master and (dtype != torch.bfloat16 or zero_stage(ds) < 1):
        raise DSConfigError(
            "optim.master_weights=bf16 keeps DeepSpeed's master weights and AdamW states in bf16; it needs "
            "train.precision=bf16 and a ZeRO stage >= 1 ds_config (e.g. ds_configs/zero3.json)"
        )
    for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
        if bf16_master or key in bf16:
            _fill(bf16, key, bf16_master, "bf16", "optim.master_weights")
    if ds.get("fp16", {}).get("enabled") not in (None, False, AUTO):
        raise DSConfigError("fp16 is not supported (Chameleon trains in bf16); set fp16.enabled=false, use bf16")
    ds.setdefault("fp16", {})["enabled"] = False
    if ds.get("checkpoint", {}).get(LOAD_UNIVERSAL_KEY) not in (None, False):
        raise DSConfigError(
            f"ds_config checkpoint.{LOAD_UNIVERSAL_KEY} is set, but arra_ds decides it per resume: a checkpoint "
            "written by another number of ranks is converted to DeepSpeed's universal form and loaded as such, "
            f"one written by the same number is loaded directly; remove checkpoint.{LOAD_UNIVERSAL_KEY}"
        )
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


def _partitioned_construction(ds_config: dict):
    """ZeRO-3: a context factory in which modules are built with their parameters partitioned over the ranks."""
    return lambda: deepspeed.zero.Init(config_dict_or_path=ds_config)


class Engine:
    """The DeepSpeed engine behind a small interface the loop needs (forward/backward/step/save)."""

    def __init__(self, model_cfg: ModelConfig, align_cfg: AlignConfig, optim_cfg: OptimConfig, ds_config: dict):
        self.ds_config = ds_config
        self.precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        zero3 = zero_stage(ds_config) == 3
        # Must stay referenced while the model is built: transformers reads it through a weakref.
        hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
        model = build_model(
            model_cfg, align_cfg, dtype=dtype, gather=_gather_for_edit if zero3 else no_gather,
            partitioned=_partitioned_construction(ds_config) if zero3 else no_partitioning,
        )
        del hf_ds_config

        groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_params)
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

    @staticmethod
    def to_universal(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
        """DeepSpeed's universal form of a checkpoint of any number of ranks (``convert_to_universal``)."""
        return convert_to_universal(checkpoint_dir, output_dir)

    def load(self, ckpt_root: str | Path, tag: str, universal: bool = False) -> None:
        """Restore ``ckpt_root/tag``: a checkpoint of this engine's own layout (same number of ranks), or,
        with ``universal``, DeepSpeed's universal form of one (``convert_to_universal``) written by any
        number of ranks, which DeepSpeed repartitions over this run's ranks, optimizer state included."""
        # DeepSpeed reads this switch only while loading (engine.load_universal_checkpoint()); whether a
        # load is universal depends on the checkpoint, not on the run, so it is set for this call only.
        config = self.engine._config
        was_universal = config.load_universal_checkpoint
        weight_decays = [group["weight_decay"] for group in self.optimizer.param_groups]  # per group (optim.py)
        config.load_universal_checkpoint = universal
        try:
            path, _ = self.engine.load_checkpoint(str(ckpt_root), tag=tag)
        finally:
            config.load_universal_checkpoint = was_universal
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no model states for {Path(ckpt_root) / tag}")
        if universal:
            self._repair_after_universal_load(weight_decays)

    def _repair_after_universal_load(self, weight_decays: list[float]) -> None:
        """Undo two shortcuts of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
        ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``):

        - it copies the hyper-parameters of parameter group 0 into every group, which would give the
          no-decay group (norms, biases) group 0's weight decay: each group gets its own back, as the
          run config sets it (the learning rate is set before every step anyway; betas and eps are
          the same in every group);
        - it stores one and the same ``step`` tensor in the state of every parameter partition, and
          torch's Adam increments ``step`` in place, once per partition, so with G groups the bias
          correction would advance G steps per update: each partition gets its own copy (DeepSpeed's
          own Adam kernels keep ``step`` as a Python int, which is never shared).
        """
        for group, weight_decay in zip(self.optimizer.param_groups, weight_decays):
            group["weight_decay"] = weight_decay
        if zero_stage(self.ds_config) != 3:
            return
        base_state = self.optimizer.optimizer.state
        for flat in self.optimizer.fp32_partitioned_groups_flat:
            state = base_state.get(flat)
            if state is not None and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def num_parameters(self) -> int:
        return self.model.num_parameters()


def convert_to_universal(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Convert the DeepSpeed checkpoint ``checkpoint_dir`` (any ZeRO stage, any number of ranks) with
    DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) into ``output_dir``, which
    then holds ``<checkpoint_dir.name>/`` (per parameter: fp32 weights, Adam's two moments) and
    ``latest_universal``; returns the converted tag directory. Needs no process group.

    Runs in this process, one worker: a process pool forked from a rank that holds a process group
    (and possibly a CUDA context) is not safe. It reads and writes the optimizer state about twice.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    converted = output_dir / checkpoint_dir.name
    args = argparse.Namespace(
        input_folder=str(checkpoint_dir),
        output_folder=str(converted),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints of a plain model carry no universal-checkpoint info; ZeRO-3 needs none
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    return converted
