"""A memory plan before launch: per-GPU bytes of a training run, by part, and whether it fits.

    plan = plan_run("configs/lumina7b_arra_adapt.yaml", ["gpus=8", "gpu_memory_gb=80", "model.path=..."])
    print(plan.render())        # launch/plan.py prints this; --json prints plan.as_dict()

Inputs: the run config (``RunConfig``: model, align, data.max_seq_len, optim.master_weights, train.micro_batch_size
and precision) + the DeepSpeed JSON (ZeRO stage, CPU offload of the optimizer / parameters) + the planner's own
keys (``PlanConfig``: gpus, gpu_memory_gb, ...). The model's parameters are counted on a meta-device
skeleton built from its config.json alone (no weights read), with ``model.trainable`` applied to it exactly
as training would (``model/trainable.py``), so a bad pattern fails here too.

Parts (GiB = 2^30 bytes; a "24 GB" card is taken as 24 GiB, as cards are sold):

* **Model states** (parameters, gradients, optimizer states, the gathered layer): DeepSpeed's own estimator,
  ``estimate_zero3_model_states_mem_needs`` (``deepspeed/runtime/zero/stage3.py``) and
  ``estimate_zero2_model_states_mem_needs`` (``stage_1_and_2.py``), split by part. For bf16 with fp32
  master weights a trained parameter costs 2 (bf16 weight) + 4 (fp32 gradient partition) + 4 (fp32
  master) + 8 (Adam's two moments) = 18 bytes, the gradient and optimizer parts divided by the GPUs from
  ZeRO-1 / ZeRO-2 on and the weight too under ZeRO-3; ZeRO-2 also keeps its 16-bit gradient partition
  (2 / N), ZeRO-1 the full 16-bit gradient (2). ZeRO-3 adds 4 bytes x the largest module (its gathered
  16-bit weight and gradient). Offloading the optimizer moves gradients + optimizer states to the host,
  offloading parameters (ZeRO-3) everything but the gathered layer. Beyond DeepSpeed's estimator (documented
  differences): frozen parameters (``model.trainable`` lora / patterns) cost only their 16-bit weight;
  ``optim.master_weights=bf16`` halves the master, gradient partition and moments (2 + 2 + 2 + 4);
  ``train.precision=fp32`` stores 4-byte weights and gradients; ZeRO-0 / ZeRO-1 have no DeepSpeed estimator
  and follow the same per-byte accounting. Host memory per node under offload: DeepSpeed's formula
  (``zero_init=1``, its 1.5x buffer factor).
* **Activations**: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198), sec. 4: a GPT layer stores s b h (34 + 5 a s / h) bytes in 16-bit without recompute,
  and with full recompute only each layer's input (2 s b h) plus one layer's working set. Adapted here to
  the Llama-style Chameleon layer as Hugging Face runs it (``layer_bytes_per_token``): RMSNorm saves an
  fp32 copy of its input, the SwiGLU MLP keeps four [s, b, I] tensors instead of GPT's 2 x 4h, qk-norm adds
  two LayerNorms, flash / SDPA attention keeps q, k, v, its output and the log-sum-exp and no [s, s]
  scores (eager keeps the fp32 softmax and its 16-bit cast: 4 + 2 bytes a s^2 b per layer, plus one
  [b, 1, s, s] mask), no dropout unless ``model.residual_dropout`` / ``model.attention_dropout`` (masks of
  1 byte). Frozen weights save no input for their gradient (PyTorch saves only what backward needs); LoRA
  adapters save theirs (a dropout copy per adapted layer when ``model.lora.dropout`` > 0). Checked against
  the saved-tensor bytes of the debug model on CPU (``tests/test_plan.py``) and against the GPU check's
  measured peak (``bench/gpu``). Plus a backward working set: the gradients of one MLP in flight
  (3 [s, b, I] + 2 [s, b, h]).
* **LM head / loss**: the chunked loss (``kernels/lm_loss_torch.py``) holds one [chunk, V] fp32 logits block
  and logsumexp's temporary of the same size; the fused kernel one [chunk, V] block in the 16-bit dtype.
  Both keep the [N, h] gradient of the hidden states, and an fp32 [V, h] gradient accumulator when the
  head trains (all, a pattern, or its image rows), plus the [V, h] summed weight of the image-row delta.
* **Alignment head**: the aligned hidden states [N, h] and the projector's [N, D] activations (torch path;
  the fused kernel keeps only its input).
* **ZeRO buffers**: the reduce bucket and the ZeRO-3 prefetch (ZeRO-1/2: all-gather) bucket, 16-bit.
* **CUDA context + allocator**: a fixed 1 GiB (context, cuBLAS workspace, NCCL) and 5 % of the rest for
  the caching allocator's fragmentation.

Verdict: fits when the total is at most ``gpu_memory_gb``; otherwise "does not fit: ... try ..." with each
single change that would fit (micro-batch, CPU offload, LoRA, more GPUs), each planned.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from arra_ds.config import apply_overrides, from_dict, read_config_file
from arra_ds.errors import ConfigError
from arra_ds.model.arra import resolved_lora
from arra_ds.model.config import ModelConfig
from arra_ds.model.trainable import BASE_LAYER, HeadRows, apply_trainable, trains_image_rows, uses_lora
from arra_ds.train.engine import DSConfigError, fill_ds_config, load_ds_config, zero_stage
from arra_ds.train.run_config import DEFAULT_CONFIG, REPO_ROOT, RunConfig

GIB = 2**30
DEFAULT_DS_CONFIG = "ds_configs/zero3.json"  # the 7B recipes' (README "Training the 7B recipes")
OFFLOAD_DS_CONFIG = "ds_configs/zero3_offload.json"
SHAPES_DIR = "configs/shapes"  # config.json files with a model's shape only (no weights): for planning
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS workspace, NCCL buffers: outside torch's allocator
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, as a share of what torch allocates
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor in its host-memory estimate
# Widths of the target features of the preset encoders (data/features.py PRESETS), for align.feature_dim=0.
ENCODER_FEATURE_DIMS = {"biomedclip": 512, "clip": 768, "clip_b16": 512, "medsam": 256, "sam": 256}
FALLBACK_FEATURE_DIM = 1024
MAX_SUGGESTED_GPUS = 512
# Linear layers of a Llama-style decoder layer, by the group that shares one input.
ATTENTION_INPUT_LINEARS = ("q_proj", "k_proj", "v_proj")
MLP_INPUT_LINEARS = ("gate_proj", "up_proj")
# LlamaGen's module names -> the Llama-style names the activation formula uses (wqkv: one Linear for q, k, v)
LLAMAGEN_NAMES = {"wqkv": "q_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
                  "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclass
class PlanConfig:
    """The planner's own keys (``key=value`` beside the run config's)."""

    gpus: int = 1  # GPUs (data-parallel ranks) in all
    gpu_memory_gb: float = 80.0  # memory of one GPU in GiB, as the card is sold (a "24 GB" card: 24)
    gpus_per_node: int = 8  # GPUs per node: host memory under CPU offload is per node
    seq_len: int = 0  # tokens per sample; 0 = data.max_seq_len (LlamaGen: model.llamagen.block_size)
    cpu_memory_gb: float = 0.0  # host memory per node that CPU offload must fit in; 0 = not checked

    def validate(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"gpus={self.gpus} and gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.gpu_memory_gb <= 0:
            raise ConfigError(f"gpu_memory_gb={self.gpu_memory_gb} must be > 0 (e.g. 24, 48, 80)")
        if self.seq_len < 0 or self.cpu_memory_gb < 0:
            raise ConfigError("seq_len and cpu_memory_gb must be >= 0 (0: from data.max_seq_len / not checked)")


PLAN_KEYS = tuple(f.name for f in dataclasses.fields(PlanConfig))


# ------------------------------------------------------------------------------------------------
# the model, counted on the meta device
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    """Shape and parameter counts of the backbone (+ projector) with ``model.trainable`` applied."""

    source: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    qk_norm: bool  # Chameleon's per-head LayerNorm on q and k
    total_params: int  # every parameter trained or not: backbone (+ adapters) + projector
    trainable_params: int
    projector_params: int
    lora_params: int
    image_row_params: int
    largest_module_params: int  # DeepSpeed's "largest layer": most parameters held by one module itself
    largest_module: str
    first_graph_layer: int  # decoder layers before this one need no activations (nothing below them trains)
    trained_layers: list[list[str]]  # per decoder layer: its modules whose own weights train (Llama-style names)
    lora_targets: list[str]  # leaf names (Llama-style) of the adapted Linear layers
    embedding_trains: bool
    final_norm_trains: bool
    head_trains: bool  # the head's weight (or its image-row delta) gets a gradient
    head_delta: bool  # the image-row delta (a [V, h] summed weight per call)
    lora_rank: int
    lora_dropout: float
    trainable_mode: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _feature_dim(align) -> int:
    return align.feature_dim or ENCODER_FEATURE_DIMS.get(align.encoder, FALLBACK_FEATURE_DIM)


def _projector_params(hidden: int, align) -> int:
    if not align.enabled or align.projector != "mlp":
        return 0
    dim = _feature_dim(align)
    return hidden * dim + dim + dim * dim + dim  # fc1 [D, H] + bias, fc2 [D, D] + bias


def _skeleton(cfg: ModelConfig) -> tuple[nn.Module, HeadRows, dict]:
    """(backbone on the meta device, its head rows, shape) from config.json / the sizes in code."""
    backbone = cfg.backbone
    arch = backbone.architecture(cfg)
    shape = dict(hidden=arch.hidden, layers=arch.layers, heads=arch.heads, kv_heads=arch.kv_heads,
                 intermediate=arch.intermediate, vocab=arch.vocab, qk_norm=arch.qk_norm)
    return backbone.skeleton(cfg, torch.bfloat16), HeadRows(arch.head, arch.image_rows), shape


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for container, index in zip(parts, parts[1:]):
        if container == "layers" and index.isdigit():
            return int(index)
    return None


_FACTS_CACHE: dict[str, ModelFacts] = {}


def model_facts(model_cfg: ModelConfig, align) -> ModelFacts:
    """Count the backbone ``model_cfg`` describes, on the meta device, with its ``model.trainable`` applied
    (remembered per model config, config.json and projector: the suggestions re-plan many variants)."""
    config_json = Path(model_cfg.path) / "config.json" if model_cfg.path else None
    key = json.dumps([dataclasses.asdict(model_cfg), config_json.read_text() if config_json and config_json.is_file()
                      else "", _projector_params(model_cfg.shape().hidden_size, align)], sort_keys=True, default=str)  # fmt: skip
    if key not in _FACTS_CACHE:
        _FACTS_CACHE[key] = _count_model(model_cfg, align)
    return _FACTS_CACHE[key]


def _count_model(model_cfg: ModelConfig, align) -> ModelFacts:
    module, head, shape = _skeleton(model_cfg)
    largest, largest_name = 0, ""
    for name, sub in module.named_modules():
        own = sum(p.numel() for p in sub.parameters(recurse=False))
        if own > largest:
            largest, largest_name = own, name
    needs_rows = trains_image_rows(model_cfg.trainable, model_cfg.lora)
    with torch.device("meta"):  # the adapters too: peft would initialise them on the CPU first
        summary = apply_trainable(module, model_cfg.trainable, resolved_lora(model_cfg), head if needs_rows else None)

    layers = shape["layers"]
    trained_layers: list[set[str]] = [set() for _ in range(layers)]
    lora_targets: set[str] = set()
    first_graph_layer = layers
    embedding = final_norm = head_trains = False
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        index = _layer_index(name)
        if index is not None:
            first_graph_layer = min(first_graph_layer, index)
            if ".lora_" in name:
                leaf = name.split(".lora_")[0].rpartition(".")[2]
                lora_targets.add(LLAMAGEN_NAMES.get(leaf, leaf))
            else:
                leaf = name.rpartition(".")[0].replace(f".{BASE_LAYER}", "").rpartition(".")[2]
                trained_layers[index].add(LLAMAGEN_NAMES.get(leaf, leaf))
        elif "embed" in name or name.startswith(("tok_embeddings", "cls_embedding")):
            embedding = True
            first_graph_layer = 0
        elif name.startswith((head.name + ".",)):
            head_trains = True
        else:
            final_norm = True
    projector = _projector_params(shape["hidden"], align)
    return ModelFacts(
        source=model_cfg.source, **shape,
        total_params=summary.total + projector, trainable_params=summary.trainable + projector,
        projector_params=projector, lora_params=summary.lora, image_row_params=summary.image_head_rows,
        largest_module_params=largest, largest_module=largest_name, first_graph_layer=first_graph_layer,
        trained_layers=[sorted(t) for t in trained_layers], lora_targets=sorted(lora_targets), embedding_trains=embedding,
        final_norm_trains=final_norm, head_trains=head_trains, head_delta=summary.image_head_rows > 0,
        lora_rank=model_cfg.lora.rank if uses_lora(model_cfg.trainable) else 0,
        lora_dropout=model_cfg.lora.dropout if uses_lora(model_cfg.trainable) else 0.0,
        trainable_mode=summary.mode,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the setting: run config + DeepSpeed JSON + planner keys, resolved
# ------------------------------------------------------------------------------------------------


@dataclass
class Setting:
    gpus: int
    gpus_per_node: int
    gpu_memory_gib: float
    cpu_memory_gib: float
    seq_len: int
    micro_batch: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str  # bf16 | fp32
    master_weights: str  # fp32 | bf16
    checkpointing: bool
    attention: str  # flash_attention_2 | sdpa | eager
    fused_lm_loss: bool
    lm_chunk: int
    residual_dropout: float
    attention_dropout: float
    align: bool
    align_fused: bool
    feature_dim: int
    reduce_bucket: int  # elements
    gather_bucket: int  # elements: ZeRO-3 prefetch / ZeRO-1,2 all-gather bucket
    ds_config: str
    device: str = "cuda"  # what runs it: cuda (the plan) or cpu (the CPU check of the activation formula)

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def mask_bytes(self) -> int:
        """A dropout mask: bool from CUDA's fused dropout; on the CPU a noise tensor in the input dtype."""
        return 1 if self.device == "cuda" else self.act_bytes

    @property
    def norm_stat_bytes(self) -> int:
        """LayerNorm's saved mean / rstd: fp32 on CUDA, the input dtype on the CPU."""
        return 4 if self.device == "cuda" else self.act_bytes

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


def _offloaded(zero: dict, key: str) -> bool:
    return zero.get(key, {}).get("device", "none") not in (None, "none")


def _filled_ds_config(cfg: RunConfig, plan_cfg: PlanConfig, path: Path) -> tuple[dict, str]:
    """(the DeepSpeed JSON filled as training fills it, precision). ``fill_ds_config`` decides bf16 for the
    machine it runs on (fp32 on this CPU), so precision is resolved here for a GPU and the JSON filled with
    fp32, which checks and fills everything else the same way."""
    template = load_ds_config(path)
    explicit = template.get("bf16", {}).get("enabled", "auto")
    precision = cfg.train.precision if cfg.train.precision != "auto" else "bf16"  # the plan is for GPUs
    if isinstance(explicit, bool) and explicit != (precision == "bf16"):
        raise DSConfigError(
            f"ds_config bf16.enabled={explicit} contradicts the run config (train.precision={cfg.train.precision}); "
            'set it to "auto" in the ds_config so the run config decides'
        )
    template = {k: v for k, v in template.items() if k != "bf16"}
    train = dataclasses.replace(cfg.train, global_batch_size=0, precision="fp32")  # memory: no accumulation
    optim = dataclasses.replace(cfg.optim, master_weights="fp32")
    ds = fill_ds_config(template, train, optim, plan_cfg.gpus, cfg.model.shape().hidden_size)
    if cfg.optim.master_weights == "bf16" and (precision != "bf16" or zero_stage(ds) < 1):
        raise DSConfigError(
            "optim.master_weights=bf16 keeps DeepSpeed's master weights and AdamW states in bf16; it needs "
            "train.precision=bf16 and a ZeRO stage >= 1 ds_config (e.g. ds_configs/zero3.json)"
        )
    return ds, precision


def resolve_setting(cfg: RunConfig, plan_cfg: PlanConfig, ds_config_path: str) -> Setting:
    path = Path(ds_config_path)
    if not path.is_absolute() and not path.is_file():
        path = REPO_ROOT / path
    ds, precision = _filled_ds_config(cfg, plan_cfg, path)
    train = cfg.train
    zero = ds.get("zero_optimization", {})
    stage = zero_stage(ds)
    seq_len = plan_cfg.seq_len or cfg.data.max_seq_len
    max_positions = cfg.model.shape().max_positions
    if cfg.model.class_conditional and not plan_cfg.seq_len:
        seq_len = max_positions  # a sample is its codes (the class token adds one position)
    if max_positions and seq_len > max_positions:
        raise ConfigError(f"seq_len={seq_len} exceeds the backbone's max_position_embeddings={max_positions}")
    gather = zero.get("stage3_prefetch_bucket_size" if stage == 3 else "allgather_bucket_size", 0) if stage else 0
    return Setting(
        gpus=plan_cfg.gpus, gpus_per_node=min(plan_cfg.gpus_per_node, plan_cfg.gpus),
        gpu_memory_gib=plan_cfg.gpu_memory_gb, cpu_memory_gib=plan_cfg.cpu_memory_gb, seq_len=seq_len,
        micro_batch=train.micro_batch_size, zero_stage=stage,
        offload_optimizer=stage > 0 and _offloaded(zero, "offload_optimizer"),
        offload_param=stage == 3 and _offloaded(zero, "offload_param"),
        precision=precision, master_weights=cfg.optim.master_weights,
        checkpointing=cfg.model.activation_checkpointing,
        attention="sdpa" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation,
        fused_lm_loss=cfg.model.fused_kernels != "off", lm_chunk=cfg.model.lm_loss_chunk_size,
        residual_dropout=cfg.model.residual_dropout, attention_dropout=cfg.model.attention_dropout,
        align=cfg.align.enabled, align_fused=cfg.model.fused_kernels != "off" and cfg.align.projector == "mlp",
        feature_dim=_feature_dim(cfg.align), reduce_bucket=int(zero.get("reduce_bucket_size", 0)) if stage else 0,
        gather_bucket=int(gather), ds_config=str(ds_config_path),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# model states (DeepSpeed's estimator, by part)
# ------------------------------------------------------------------------------------------------


@dataclass
class Part:
    key: str
    label: str
    bytes: int
    how: str


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def bytes_per_param(setting: Setting) -> dict[str, int]:
    """Bytes of one parameter by state: weight (16-bit copy), grad16 (16-bit gradient), grad_partition
    (the gradient the optimizer steps with), master, moments (Adam's two)."""
    weight = setting.act_bytes
    master = 2 if setting.master_weights == "bf16" else 4
    return {"weight": weight, "grad16": weight, "grad_partition": master, "master": master, "moments": 2 * master}


def model_state_parts(facts: ModelFacts, s: Setting) -> list[Part]:
    n, total, trained = s.gpus, facts.total_params, facts.trainable_params
    b = bytes_per_param(s)
    stage = s.zero_stage
    on_gpu_optimizer = not s.offload_optimizer
    parts = []
    if s.offload_param:
        parts.append(Part("parameters", f"parameters ({s.precision})", 0, "offloaded to the CPU (offload_param)"))
    else:
        shard = n if stage == 3 else 1
        parts.append(Part("parameters", f"parameters ({s.precision})", b["weight"] * total // shard,
                          f"{b['weight']} B x {_fmt_count(total)}" + (f" / {n} GPUs" if shard > 1 else "")))
    # gradients: the 16-bit gradient (full at ZeRO-0/1, partitioned at ZeRO-2; ZeRO-3 reduce-scatters it
    # through the bucket straight into the partition) + the partition the optimizer reads
    grad16 = {0: b["grad16"] * trained, 1: b["grad16"] * trained, 2: b["grad16"] * trained // n, 3: 0}[stage]
    partition = b["grad_partition"] * trained // (n if stage else 1)
    if s.offload_optimizer:
        parts.append(Part("gradients", "gradients", 0 if stage >= 2 else grad16,
                          "partitions offloaded to the CPU with the optimizer"))
    else:
        how = f"{b['grad_partition']} B x {_fmt_count(trained)} trained" + (f" / {n}" if stage and n > 1 else "")
        if grad16:
            how = f"{b['grad16']} B x {_fmt_count(trained)}" + (f" / {n}" if stage == 2 and n > 1 else "") + " + " + how
        parts.append(Part("gradients", "gradients", grad16 + partition, how))
    optimizer = (b["master"] + b["moments"]) * trained // (n if stage else 1)
    parts.append(Part(
        "optimizer", "optimizer states", optimizer if on_gpu_optimizer else 0,
        f"({b['master']} master + {b['moments']} Adam) B x {_fmt_count(trained)} trained" + (f" / {n}" if stage and n > 1 else "")
        if on_gpu_optimizer else "offloaded to the CPU (offload_optimizer)",
    ))  # fmt: skip
    if stage == 3:
        parts.append(Part("gathered_layer", "gathered layer (ZeRO-3)", 2 * b["weight"] * facts.largest_module_params,
                          f"{2 * b['weight']} B x {_fmt_count(facts.largest_module_params)} ({facts.largest_module})"))
    return parts


def host_bytes_per_node(facts: ModelFacts, s: Setting) -> int:
    """DeepSpeed's CPU-memory estimate (zero_init=1, buffer factor 1.5) for the offloaded states, per node."""
    if not (s.offload_optimizer or s.offload_param):
        return 0
    b = bytes_per_param(s)
    states = (b["grad_partition"] + b["master"] + b["moments"]) * facts.trainable_params
    if s.offload_param:
        states += b["weight"] * facts.total_params
    nodes = math.ceil(s.gpus / s.gpus_per_node)
    if s.zero_stage == 3:
        return int(states / nodes * DS_BUFFER_FACTOR)
    # ZeRO-1/2 offload: DeepSpeed's max(4 x GPUs, 16) bytes per parameter, not divided by the nodes
    per_param = max(4 * s.gpus, b["grad_partition"] + b["master"] + b["moments"])
    return int(per_param * facts.trainable_params * DS_BUFFER_FACTOR)


# ------------------------------------------------------------------------------------------------
# activations (Korthikanti et al. 2022, adapted to the Llama-style Chameleon layer)
# ------------------------------------------------------------------------------------------------


def _linear_inputs(
    members: Iterable[str], in_features: int, trained: bool, facts: ModelFacts, s: Setting, input_grad: bool = True
) -> int:
    """Bytes per token that Linear layers sharing one input keep for their backward."""
    p = s.act_bytes
    adapted = [m for m in members if m in facts.lora_targets]
    dropout = facts.lora_dropout > 0
    shared = trained or (adapted and not dropout)
    total = p * in_features if shared else 0
    if dropout:  # peft: one dropout per adapter; its output, and its mask where the input needs a gradient
        total += len(adapted) * (p + (s.mask_bytes if input_grad else 0)) * in_features
    return total + len(adapted) * p * facts.lora_rank  # lora_A's output, saved by lora_B


def layer_bytes_per_token(
    facts: ModelFacts, s: Setting, trained: Iterable[str] = (), input_requires_grad: bool = True
) -> dict[str, float]:
    """Bytes one decoder layer keeps per token for backward, by part (eager's [s, s] scores per token too).

    ``trained``: the layer's modules whose own weights train (Llama-style names: q_proj, input_layernorm,
    ...; all of them when the whole model trains); other weights save no input for their gradient.
    ``input_requires_grad``: False for the lowest layer in the graph when nothing below it trains."""
    trained = set(trained)
    p, h, inter, a = s.act_bytes, facts.hidden, facts.intermediate, facts.heads
    kv = facts.kv_heads * facts.head_dim
    fp32 = 4

    def norm(name: str, input_grad: bool = True) -> int:
        # RMSNorm (in fp32): its fp32 input copy (the input itself in fp32) and 1/rms where the input needs a
        # gradient; the normed 16-bit tensor where its weight trains
        return (fp32 * h + fp32 if input_grad else 0) + (p * h if name in trained else 0)

    parts = {"norms": norm("input_layernorm", input_requires_grad) + norm("post_attention_layernorm")}
    qkv_trained = bool(trained & set(ATTENTION_INPUT_LINEARS))
    parts["attention_inputs"] = _linear_inputs(ATTENTION_INPUT_LINEARS, h, qkv_trained, facts, s, input_requires_grad)
    if facts.qk_norm:  # LayerNorm per head on q and k: input + mean / rstd per head, normed for gamma
        parts["qk_norm"] = p * (h + kv) + 2 * s.norm_stat_bytes * 2 * a
        parts["qk_norm"] += (p * h if "q_norm" in trained else 0) + (p * kv if "k_norm" in trained else 0)
    parts["rotary"] = 2 * p * facts.head_dim / s.micro_batch  # cos, sin [1, 1, s, head_dim]: one per position
    if s.attention == "eager":
        # q and k for the scores; the fp32 softmax; the matmul with v keeps its 16-bit cast (the softmax
        # itself in fp32) or, with attention dropout, the dropout output and its mask; v
        cast = p if (p != fp32 or s.attention_dropout > 0) else 0
        mask = s.mask_bytes if s.attention_dropout > 0 else 0
        parts["attention"] = p * (h + 2 * kv) + (fp32 + cast + mask) * a * s.seq_len
        # the output, transposed to [b, s, h] by a copy, is o_proj's input
        parts["o_proj_input"] = _linear_inputs(("o_proj",), h, "o_proj" in trained, facts, s)
    else:
        # flash / SDPA: q, k, v, output and the fp32 log-sum-exp, no [s, s] scores; the output is written
        # [b, s, a, d]-major, so o_proj's input is a view of it (only an adapter's dropout copy is extra)
        parts["attention"] = p * (2 * h + 2 * kv) + fp32 * a
        shared = p * h if "o_proj" in facts.lora_targets and facts.lora_dropout == 0 else 0
        parts["o_proj_input"] = _linear_inputs(("o_proj",), h, False, facts, s) - shared
    mlp_trained = bool(trained & set(MLP_INPUT_LINEARS))
    parts["mlp_inputs"] = _linear_inputs(MLP_INPUT_LINEARS, h, mlp_trained, facts, s)
    parts["swiglu"] = 3 * p * inter  # SiLU's input; the product's two factors
    parts["down_proj_input"] = _linear_inputs(("down_proj",), inter, "down_proj" in trained, facts, s)
    if s.residual_dropout > 0:
        parts["dropout_masks"] = 2 * s.mask_bytes * h  # one mask per residual branch
    return parts


def backward_working_bytes_per_token(facts: ModelFacts, s: Setting) -> int:
    """The activation gradients of one MLP in flight during backward: 3 [s, b, I] + 2 [s, b, h]."""
    return s.act_bytes * (3 * facts.intermediate + 2 * facts.hidden)


def _per_layer_bytes(facts: ModelFacts, s: Setting) -> list[float]:
    """Bytes per token of each decoder layer in the autograd graph (those at or above the lowest that trains)."""
    first = facts.first_graph_layer
    return [
        sum(layer_bytes_per_token(facts, s, facts.trained_layers[i], i > first or facts.embedding_trains).values())
        for i in range(first, facts.layers)
    ]


def _model_level_bytes(facts: ModelFacts, s: Setting, in_graph: bool) -> int:
    """Per token outside the decoder layers: the token ids (embedding backward), the final RMSNorm."""
    ids = 8 if facts.embedding_trains else 0
    final_norm = 4 * facts.hidden + 4 + (s.act_bytes * facts.hidden if facts.final_norm_trains else 0)
    return ids + (final_norm if in_graph else 0)


def saved_activation_bytes(facts: ModelFacts, s: Setting) -> int:
    """What one forward without checkpointing saves for backward (what the CPU check measures)."""
    per_layer = _per_layer_bytes(facts, s)
    return round((sum(per_layer) + _model_level_bytes(facts, s, bool(per_layer))) * s.tokens)


def activation_parts(facts: ModelFacts, s: Setting) -> tuple[int, dict]:
    """Activation bytes of one micro-batch at the backward peak, and how they add up."""
    tokens = s.tokens
    per_layer = _per_layer_bytes(facts, s)
    model_level = _model_level_bytes(facts, s, bool(per_layer)) * tokens
    mask = 0
    if s.checkpointing and per_layer:
        stored = len(per_layer) * s.act_bytes * facts.hidden * tokens  # each layer's input
        working = max(per_layer) * tokens  # one layer recomputed in backward
        # eager: the [b, 1, s, s] causal mask is an input of every checkpointed layer, kept for the recompute
        mask = s.act_bytes * s.micro_batch * s.seq_len**2 if s.attention == "eager" else 0
        how = f"{len(per_layer)} layer inputs {stored / GIB:.2f} GiB + 1 layer recomputed {working / GIB:.2f} GiB"
    else:
        stored, working = sum(per_layer) * tokens, 0
        how = f"{len(per_layer)} layers x {(per_layer[0] * tokens if per_layer else 0) / GIB:.2f} GiB"
    backward = backward_working_bytes_per_token(facts, s) * tokens if per_layer else 0
    total = int(stored + working + model_level + mask + backward)
    how += f" + backward {backward / GIB:.2f} GiB + ids / final norm {model_level / GIB:.2f} GiB"
    how += f" + mask {mask / GIB:.2f} GiB" if mask else ""
    detail = {"per_layer_bytes_per_token": per_layer[0] if per_layer else 0, "layers_in_graph": len(per_layer),
              "stored": int(stored), "recomputed_layer": int(working), "backward_working": int(backward),
              "model_level": int(model_level), "mask": int(mask), "how": how}  # fmt: skip
    return total, detail


def loss_part(facts: ModelFacts, s: Setting) -> Part:
    rows = s.tokens  # upper bound: every position has a target
    chunk = min(s.lm_chunk, rows)
    p = s.act_bytes
    if s.fused_lm_loss:
        block, what = p * chunk * facts.vocab, f"fused: [{chunk}, {facts.vocab}] {s.precision} block"
    else:
        block, what = 8 * chunk * facts.vocab, f"chunked: 2 x [{chunk}, {facts.vocab}] fp32"
    total = block + p * rows * facts.hidden  # + d loss / d hidden [N, h]
    if facts.head_trains:
        total += 4 * facts.vocab * facts.hidden
        what += f" + fp32 head gradient [{facts.vocab}, {facts.hidden}]"
    if facts.head_delta:
        total += p * facts.vocab * facts.hidden
        what += " + summed head weight (image-row delta)"
    return Part("lm_loss", "logits / LM loss", int(total), what + f" + hidden gradient [{rows}, {facts.hidden}]")


def align_part(facts: ModelFacts, s: Setting) -> Part:
    if not s.align:
        return Part("align", "alignment head", 0, "align.weight=0: no projector")
    rows, p = s.tokens, s.act_bytes  # upper bound: every position aligned (hybnext aligns each image position)
    per_row = p * facts.hidden + (0 if s.align_fused else (2 * p + 5 * 4) * s.feature_dim)
    how = f"[{rows}, {facts.hidden}] aligned states" + ("" if s.align_fused else f" + projector [{rows}, {s.feature_dim}] x 7")
    return Part("align", "alignment head", int(per_row * rows), how)


def buffer_part(s: Setting) -> Part:
    if not s.zero_stage:
        return Part("zero_buffers", "ZeRO buffers", 0, "ZeRO-0: none")
    elements = s.reduce_bucket + s.gather_bucket
    name = "prefetch" if s.zero_stage == 3 else "all-gather"
    return Part("zero_buffers", "ZeRO buffers", s.act_bytes * elements,
                f"reduce bucket {_fmt_count(s.reduce_bucket)} + {name} bucket {_fmt_count(s.gather_bucket)} elements")


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    setting: Setting
    facts: ModelFacts
    parts: list[Part]
    activation_detail: dict
    host_bytes_per_node: int
    suggestions: list[str] = field(default_factory=list)
    source: str = ""  # the config file

    @property
    def allocated_bytes(self) -> int:
        """What torch's allocator holds at the peak (comparable to torch.cuda.max_memory_allocated)."""
        return sum(p.bytes for p in self.parts if p.key != "cuda_overhead")

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def model_state_bytes(self) -> int:
        return sum(p.bytes for p in self.parts if p.key in ("parameters", "gradients", "optimizer", "gathered_layer"))

    @property
    def fits_gpu(self) -> bool:
        return self.total_bytes <= self.setting.gpu_memory_gib * GIB

    @property
    def fits_host(self) -> bool:
        return not self.setting.cpu_memory_gib or self.host_bytes_per_node <= self.setting.cpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def verdict(self) -> str:
        s = self.setting
        total = self.total_bytes / GIB
        if self.fits:
            return f"fits: {total:.1f} of {s.gpu_memory_gib:g} GiB per GPU ({s.gpu_memory_gib - total:.1f} GiB spare)"
        if not self.fits_gpu:
            why = f"{total:.1f} GiB per GPU needed, {s.gpu_memory_gib:g} GiB available"
        else:
            why = (f"CPU offload needs {self.host_bytes_per_node / GIB:.0f} GiB of host memory per node, "
                   f"{s.cpu_memory_gib:g} GiB available")  # fmt: skip
        tries = " / ".join(self.suggestions) if self.suggestions else "no single change found that fits"
        return f"does not fit: {why}; try {tries}"

    def as_dict(self) -> dict:
        return {
            "config": self.source,
            "fits": self.fits,
            "verdict": self.verdict(),
            "total_gib": round(self.total_bytes / GIB, 3),
            "allocated_gib": round(self.allocated_bytes / GIB, 3),
            "model_states_gib": round(self.model_state_bytes / GIB, 3),
            "gpu_memory_gib": self.setting.gpu_memory_gib,
            "host_gib_per_node": round(self.host_bytes_per_node / GIB, 3),
            "parts": [{"key": p.key, "label": p.label, "bytes": p.bytes, "gib": round(p.bytes / GIB, 3), "how": p.how}
                      for p in self.parts],  # fmt: skip
            "activations": self.activation_detail,
            "setting": dataclasses.asdict(self.setting),
            "model": dataclasses.asdict(self.facts),
            "suggestions": self.suggestions,
        }

    def render(self) -> str:
        s, f = self.setting, self.facts
        offload = [k for k, on in (("optimizer", s.offload_optimizer), ("parameters", s.offload_param)) if on]
        trained = 100.0 * f.trainable_params / f.total_params
        lines = [
            f"Memory plan per GPU{f' ({self.source})' if self.source else ''}: planned, not measured",
            f"  model: {f.source}, {_fmt_count(f.total_params)} parameters ({f.layers} layers, hidden {f.hidden}, "
            f"heads {f.heads}/{f.kv_heads} kv, MLP {f.intermediate}, vocab {f.vocab})",
            f"  trained: {f.trainable_mode}, {_fmt_count(f.trainable_params)} ({trained:.2f}%)"
            + (f"; LoRA r={f.lora_rank} {_fmt_count(f.lora_params)}" if f.lora_params else "")
            + (f"; image head rows {_fmt_count(f.image_row_params)}" if f.image_row_params else "")
            + (f"; projector {_fmt_count(f.projector_params)}" if f.projector_params else ""),
            f"  ZeRO-{s.zero_stage} on {s.gpus} GPU{'s' if s.gpus > 1 else ''} ({s.ds_config}), CPU offload: "
            f"{', '.join(offload) or 'none'}; {s.precision} with {s.master_weights} master weights",
            f"  {s.seq_len} tokens x micro-batch {s.micro_batch}, activation checkpointing "
            f"{'on' if s.checkpointing else 'off'}, attention {s.attention}, LM loss "
            f"{'fused' if s.fused_lm_loss else 'chunked'} (chunk {s.lm_chunk})",
            "",
            f"  {'part':28} {'GiB':>8}  how",
        ]
        for part in self.parts:
            lines.append(f"  {part.label:28} {part.bytes / GIB:8.2f}  {part.how}")
        lines.append(f"  {'total':28} {self.total_bytes / GIB:8.2f}  of {s.gpu_memory_gib:g} GiB")
        if self.host_bytes_per_node:
            lines.append(f"  host memory per node: {self.host_bytes_per_node / GIB:.1f} GiB (DeepSpeed's offload estimate)")
        lines += ["", self.verdict()]
        return "\n".join(lines)


def build_plan(cfg: RunConfig, plan_cfg: PlanConfig, ds_config: str = DEFAULT_DS_CONFIG,
               facts: ModelFacts | None = None, source: str = "") -> MemoryPlan:  # fmt: skip
    """The plan of one setting (no suggestions)."""
    setting = resolve_setting(cfg, plan_cfg, ds_config)
    facts = facts or model_facts(cfg.model, cfg.align)
    activations, detail = activation_parts(facts, setting)
    parts = model_state_parts(facts, setting)
    parts += [
        Part("activations", "activations", activations, detail["how"]),
        loss_part(facts, setting),
        align_part(facts, setting),
        buffer_part(setting),
    ]
    allocated = sum(p.bytes for p in parts)
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated)
    parts.append(Part("cuda_overhead", "CUDA context + allocator", overhead,
                      f"{CUDA_CONTEXT_BYTES / GIB:g} GiB fixed + {ALLOCATOR_SLACK:.0%} fragmentation"))
    return MemoryPlan(setting, facts, parts, detail, host_bytes_per_node(facts, setting), source=source)


def _with(cfg: RunConfig, **changes) -> RunConfig:
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, _, name = key.partition(".")
        setattr(getattr(new, section), name, value)
    return new


@dataclass
class _Change:
    """One thing a user can change, as it is written on the command line, and how it changes the inputs."""

    label: str
    run: dict = field(default_factory=dict)  # run-config key -> value
    ds_config: str = ""
    gpus: int = 0
    refacts: bool = False  # changes what trains: count the model again


def suggestions(cfg: RunConfig, plan_cfg: PlanConfig, ds_config: str, plan: MemoryPlan) -> list[str]:
    """Changes that make ``plan`` fit, each with its planned total: every single change that fits (the smallest
    that does for micro-batch and GPUs); if none does, the shortest combination of them that fits."""
    setting = plan.setting
    memo: dict[tuple, MemoryPlan | None] = {}

    def planned(changes: list[_Change]) -> MemoryPlan | None:
        key = tuple(c.label for c in changes)
        if key not in memo:
            run = {k: v for c in changes for k, v in c.run.items()}
            ds = next((c.ds_config for c in changes if c.ds_config), ds_config)
            gpus = next((c.gpus for c in changes if c.gpus), plan_cfg.gpus)
            facts = None if any(c.refacts for c in changes) else plan.facts
            try:
                memo[key] = build_plan(_with(cfg, **run), dataclasses.replace(plan_cfg, gpus=gpus), ds, facts)
            except ConfigError:
                memo[key] = None
        return memo[key]

    def fits(changes: list[_Change]) -> bool:
        candidate = planned(changes)
        return bool(candidate and candidate.fits)

    def say(changes: list[_Change]) -> str:
        return f"{' + '.join(c.label for c in changes)} ({planned(changes).total_bytes / GIB:.1f} GiB)"

    checkpointing = [] if setting.checkpointing else [
        _Change("model.activation_checkpointing=true", {"model.activation_checkpointing": True})]
    micro = [_Change(f"train.micro_batch_size={m}", {"train.micro_batch_size": m})
             for m in range(cfg.train.micro_batch_size - 1, 0, -1)]  # fmt: skip
    offload = [_Change(f"--ds_config {OFFLOAD_DS_CONFIG}", ds_config=OFFLOAD_DS_CONFIG)] if (
        setting.zero_stage == 3 and not setting.offload_optimizer) else []  # fmt: skip
    lora = [] if cfg.model.trainable == "lora" else [_Change("model.trainable=lora", {"model.trainable": "lora"}, refacts=True)]
    more_gpus = []
    if setting.zero_stage:
        gpus = plan_cfg.gpus * 2
        while gpus <= MAX_SUGGESTED_GPUS:
            more_gpus.append(_Change(f"gpus={gpus}", gpus=gpus))
            gpus *= 2

    out = []
    for change in checkpointing + offload + lora:
        if fits([change]):
            out.append(say([change]))
    for options in (micro, more_gpus):  # the smallest step that fits
        first = next((c for c in options if fits([c])), None)
        if first:
            out.append(say([first]))
    if out:
        return out
    # no single change fits: add them up, cheapest first, the micro-batch last at its smallest that fits
    combined: list[_Change] = []
    for group in (checkpointing, lora, offload):
        combined += group
        if fits(combined):
            return [say(combined)]
        for m in micro:
            if fits(combined + [m]):
                return [say(combined + [m])]
    combined += micro[-1:]
    for g in more_gpus:
        if fits(combined + [g]):
            return [say(combined + [g])]
    return []


# ------------------------------------------------------------------------------------------------
# from a config file + key=value overrides (launch/plan.py)
# ------------------------------------------------------------------------------------------------


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(planner keys, run-config overrides): ``gpus=8`` and the like go to ``PlanConfig``."""
    plan, run = [], []
    for text in overrides:
        (plan if text.partition("=")[0].strip() in PLAN_KEYS else run).append(text)
    return plan, run


def load_plan_configs(config_path: str | None, overrides: Iterable[str]) -> tuple[RunConfig, PlanConfig]:
    """The run config (only what a plan reads is validated: the data set need not exist here) + plan keys."""
    plan_overrides, run_overrides = split_overrides(overrides)
    plan_cfg = from_dict(PlanConfig, apply_overrides({}, plan_overrides))
    plan_cfg.validate()
    data = apply_overrides(read_config_file(config_path or DEFAULT_CONFIG), run_overrides)
    cfg = from_dict(RunConfig, data)
    try:
        cfg.model.validate()
    except ConfigError as e:  # the planner reads only the model's shape: say that a config.json alone will do
        raise ConfigError(f"{e} (the memory plan reads only the model's shape: a directory with config.json alone "
                          f"will do, e.g. model.path={SHAPES_DIR}/chameleon7b)") from e
    for section in (cfg.align, cfg.optim, cfg.train):
        section.validate()
    if cfg.data.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} must be >= 2")
    return cfg, plan_cfg


def plan_run(config_path: str | None, overrides: Iterable[str] = (), ds_config: str = DEFAULT_DS_CONFIG) -> MemoryPlan:
    """The plan for ``config_path`` + overrides (planner keys included), with suggestions when it does not fit."""
    cfg, plan_cfg = load_plan_configs(config_path, overrides)
    plan = build_plan(cfg, plan_cfg, ds_config, source=str(config_path or DEFAULT_CONFIG))
    if not plan.fits:
        plan.suggestions = suggestions(cfg, plan_cfg, ds_config, plan)
    return plan
