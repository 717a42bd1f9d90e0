"""What is trained: every parameter (the paper), LoRA adapters, or the parameters that patterns name.

``model.trainable`` (``ModelConfig`` in ``model/config.py``) takes

    all                    every backbone parameter (ARRA as published; the default)
    lora                   LoRA adapters on ``model.lora.target_modules`` (through ``peft``), plus a trainable
                           delta on the image-token rows of the LM head when ``model.lora.train_image_head_rows``
    [pattern, ...]         the parameters that shell-style globs name (``fnmatch``: ``*`` ``?`` ``[0-3]``, matched
                           against the whole name; ``*`` also crosses dots), e.g. ``[lm_head, "model.layers.[0-3].*"]``.
                           A pattern selects a module (and all its parameters) or one parameter. Two keywords may
                           stand in the list: ``lora`` (add the adapters of ``model.lora.*`` as well) and
                           ``image_head_rows`` (the LM head's image-row delta alone)

Everything else is frozen (``requires_grad=False``). The alignment projector lives outside the backbone
(``ARRAModel.align_head``) and is always trained: call ``apply_trainable`` on the backbone module only.
YAML reads ``[0-3]`` as a list, so quote such a pattern: ``model.trainable='["model.layers.[0-3].*"]'``.

Parameter names after ``apply_trainable`` (what a checkpoint holds; ``peft.inject_adapter_in_model`` on the
backbone itself, so nothing is prefixed and the base names only gain ``base_layer``):

    model.layers.0.self_attn.q_proj.base_layer.weight     the frozen base weight (was ...q_proj.weight)
    model.layers.0.self_attn.q_proj.lora_A.default.weight [r, in]   LoRA down-projection (peft's init)
    model.layers.0.self_attn.q_proj.lora_B.default.weight [out, r]  LoRA up-projection (zero at init)
    lm_head.weight                                         unchanged, frozen
    lm_head.image_rows_delta                               [N_image, H] added to the image rows (zero at init)
    lm_head.image_row_ids                                  [N_image] int64 buffer: which rows the delta adds to

``merge_lora`` turns either a module or such a state dict back into plain base names
(W + B A * alpha / r, and the head rows plus their delta); ``write_adapter`` writes the adapter alone in
peft's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``, the head rows as peft's
``trainable_token_indices`` on ``lm_head``), which ``peft.PeftModel.from_pretrained`` loads onto a stock
``transformers`` model.

The image rows of Chameleon's LM head. ARRA from Chameleon-7B starts these rows at zero
(``model.init_image_head``): the released model cannot draw. LoRA leaves lm_head alone, and a zero head gives
every image code the same logit whatever the hidden state, so without training these rows the model can
never prefer one code over another. ``model.lora.train_image_head_rows=true`` (the default) trains them, as a
separate small parameter (``image_rows_delta``, 8192 x 4096 = 34 M for Chameleon-7B, 0.5 % of the model)
rather than as a gradient mask on the [65536, 4096] head: under ZeRO-3 the head weight is a partitioned
flat buffer whose gradient DeepSpeed reduce-scatters itself (a tensor hook on it is not a supported place to
mask), a masked full head would carry AdamW states for all 268 M rows, and decoupled weight decay would still
move the masked text rows. A separate parameter is trained, partitioned and checkpointed like any other,
and every text row stays bitwise the base model's.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch
from torch import nn

from arra_ds.errors import ConfigError
from arra_ds.io import atomic_write, atomic_write_json
from arra_ds.model.interface import LMHeadWithLoss

TRAIN_ALL = "all"
TRAIN_LORA = "lora"
IMAGE_HEAD_ROWS = "image_head_rows"  # keyword in a pattern list: the LM head's image-row delta
KEYWORDS = (TRAIN_LORA, IMAGE_HEAD_ROWS)
# all | lora | a list; a plain string other than all / lora is refused by validate_trainable with the syntax
TrainableSpec = Union[str, list[str]]

ADAPTER_NAME = "default"  # peft's adapter name: part of the LoRA parameter names
BASE_LAYER = "base_layer"
DELTA_NAME = "image_rows_delta"
ROW_IDS_NAME = "image_row_ids"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's on-disk key prefix (a PeftModel around the base model)
PEFT_TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # peft's trainable_token_indices weight on a module

# Llama-style attention and SwiGLU MLP projections (Chameleon, Lumina-mGPT): every Linear of a decoder layer.
# QLoRA (Dettmers et al. 2023, sec. 4 and appendix A) found that LoRA on *all* linear layers of the
# transformer blocks is what matches full fine-tuning, and that r matters little once it does. Each backbone
# names its own (``Architecture.lora_targets``); these are the Chameleon family's.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LORA_PARAM = re.compile(r"\.lora_(A|B)\." + ADAPTER_NAME + r"\.weight$")


@dataclass
class LoraConfig:
    # r = 16 with alpha = 2r (scale alpha / r = 2) is the common setting for 7B models with all linear layers
    # adapted (QLoRA's finding above: with all layers targeted, r from 8 to 64 trains alike); 16 leaves room
    # for an image domain the base model has not seen. Dropout 0.05: QLoRA's value for the larger models
    # (0.1 for 7B-13B on small data); it costs activation memory (launch/plan.py counts it), 0 disables it.
    rank: int = 16  # r, the adapters' rank
    alpha: float = 32.0  # LoRA alpha: the update B A is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapters' input (training only)
    # Linear layers by name; [] = every Linear of the backbone's blocks (Chameleon: q/k/v/o/gate/up/down_proj;
    # LlamaGen: wqkv, wo, w1, w2, w3), as QLoRA recommends
    target_modules: list[str] = field(default_factory=list)  # Linear layers by name; [] = the backbone's (all of a block)
    train_image_head_rows: bool = True  # also train the LM head's image-token rows (a zero head cannot draw)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"model.lora.rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if not all(isinstance(t, str) and t.strip() for t in self.target_modules):
            raise ConfigError(
                f"model.lora.target_modules={self.target_modules} must be names of Linear layers, e.g. "
                f"model.lora.target_modules=[{','.join(DEFAULT_LORA_TARGETS)}], or [] for the backbone's"
            )


def validate_trainable(trainable: TrainableSpec, lora: LoraConfig) -> None:
    """What can be checked without the model (``apply_trainable`` checks the names against the model)."""
    if isinstance(trainable, str):
        if trainable not in (TRAIN_ALL, TRAIN_LORA):
            raise ConfigError(
                f"model.trainable={trainable}: use all, lora, or a list of module-name patterns in brackets, "
                f"e.g. model.trainable=[{trainable}]"
            )
    else:
        if not trainable:
            raise ConfigError(
                "model.trainable=[] trains nothing; use all, lora or a list of patterns, e.g. model.trainable=[lm_head]"
            )
        bad = [p for p in trainable if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ConfigError(f"model.trainable: {bad} are not patterns; give module or parameter names (globs)")
        if TRAIN_ALL in trainable:
            raise ConfigError("model.trainable: 'all' cannot stand in a list; use model.trainable=all")
    if uses_lora(trainable):
        lora.validate()


def uses_lora(trainable: TrainableSpec) -> bool:
    return trainable == TRAIN_LORA or (isinstance(trainable, list) and TRAIN_LORA in trainable)


def trains_image_rows(trainable: TrainableSpec, lora: LoraConfig) -> bool:
    listed = isinstance(trainable, list) and IMAGE_HEAD_ROWS in trainable
    return listed or (uses_lora(trainable) and lora.train_image_head_rows)


def _patterns(trainable: TrainableSpec) -> list[str]:
    return [p for p in trainable if p not in KEYWORDS] if isinstance(trainable, list) else []


# ------------------------------------------------------------------------------------------------
# the LM head's image rows
# ------------------------------------------------------------------------------------------------


@dataclass
class HeadRows:
    """Where the LM head is (its attribute path in the backbone) and which of its rows are image codes."""

    name: str  # e.g. "lm_head" (Chameleon), "output" (LlamaGen)
    row_ids: torch.Tensor  # int64 [N]


class LMHeadWithImageRows(LMHeadWithLoss):
    """The LM head with a trainable delta on some rows: the weight it uses is W + scatter(rows, delta).

    ``weight`` [V, H] keeps its name and stays frozen; ``image_rows_delta`` [N, H] starts at zero, so the
    head gives the base model's logits until it trains. Both are parameters of this module, so ZeRO-3
    gathers them together when the head runs. Cost: one [V, H] temporary (the summed weight) per call.
    """

    def __init__(self, head: LMHeadWithLoss, row_ids: torch.Tensor):
        super().__init__(head.weight, head.z_loss_weight, head.chunk_size, head.fused_kernels, bias=head.bias)
        weight = head.weight
        hidden_size = getattr(weight, "ds_shape", weight.shape)[1]  # ZeRO-3: a partitioned weight is flat
        self.register_buffer(ROW_IDS_NAME, row_ids.to(device=weight.device, dtype=torch.long).clone())
        self.image_rows_delta = nn.Parameter(
            torch.zeros(len(row_ids), hidden_size, dtype=weight.dtype, device=weight.device)
        )

    def effective_weight(self) -> torch.Tensor:
        """[V, H]: the head weight with the delta added to its image rows."""
        return self.weight.index_add(0, self.image_row_ids, self.image_rows_delta.to(self.weight.dtype))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


# ------------------------------------------------------------------------------------------------
# names the errors show
# ------------------------------------------------------------------------------------------------


def _collapse_indices(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def module_name_summary(module: nn.Module) -> str:
    """The modules that hold parameters, layer indices collapsed to ``*`` and siblings grouped:
    ``model.embed_tokens, model.layers.*.mlp.{down_proj,gate_proj,up_proj}, ... (* = 0..31)``."""
    groups: dict[str, set[str]] = {}
    indices: set[int] = set()
    for name, sub in module.named_modules():
        if not name or not any(True for _ in sub.parameters(recurse=False)):
            continue
        name = name.replace(f".{BASE_LAYER}", "")
        if ".lora_" in name:  # adapters: not names a user selects
            continue
        indices.update(int(p) for p in name.split(".") if p.isdigit())
        parent, _, leaf = _collapse_indices(name).rpartition(".")
        groups.setdefault(parent, set()).add(leaf)
    parts = []
    for parent, leaves in sorted(groups.items()):
        inner = next(iter(leaves)) if len(leaves) == 1 else "{" + ",".join(sorted(leaves)) + "}"
        parts.append(f"{parent}.{inner}" if parent else inner)
    span = f" (* = {min(indices)}..{max(indices)})" if indices else ""
    return ", ".join(parts) + span


def linear_leaf_names(module: nn.Module) -> list[str]:
    """Deduplicated last name parts of the Linear layers (what LoRA can target): down_proj, gate_proj, ..."""
    return sorted({
        name.rpartition(".")[2] for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear) and name and ".lora_" not in name
    })  # fmt: skip


# ------------------------------------------------------------------------------------------------
# apply
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainableSummary:
    """Parameter counts after ``apply_trainable`` (the backbone only; the projector is counted elsewhere)."""

    mode: str  # all | lora | patterns
    total: int  # every backbone parameter, adapters and the head-row delta included
    trainable: int
    lora: int  # LoRA adapter parameters (all trained)
    image_head_rows: int  # parameters of the image-row delta (trained)
    trained_modules: list[str]  # the trained parameters' names, layer indices collapsed to *

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "total": self.total, "trainable": self.trainable, "frozen": self.frozen,
            "lora": self.lora, "image_head_rows": self.image_head_rows, "trained_modules": self.trained_modules,
        }  # fmt: skip

    def describe(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable: {self.mode}, {self.trainable:,} of {self.total:,} backbone parameters ({share:.2f}%)"
            + (f"; LoRA {self.lora:,}" if self.lora else "")
            + (f"; image head rows {self.image_head_rows:,}" if self.image_head_rows else "")
        )


def _lora_target_problems(module: nn.Module, targets: Iterable[str]) -> list[str]:
    """Every target must name (as peft matches: the whole name or a dotted suffix) at least one Linear layer."""
    named = list(module.named_modules())
    problems = []
    for target in targets:
        hits = [sub for name, sub in named if name == target or name.endswith("." + target)]
        if not hits:
            problems.append(f"model.lora.target_modules: '{target}' names no module")
        elif not any(isinstance(sub, nn.Linear) for sub in hits):
            kinds = sorted({type(sub).__name__ for sub in hits})
            problems.append(f"model.lora.target_modules: '{target}' is not a Linear layer ({', '.join(kinds)})")
    return problems


def _apply_lora(module: nn.Module, lora: LoraConfig) -> None:
    import peft  # reason: peft (and its transformers integrations) loads only where LoRA is used

    peft_config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none",
    )  # fmt: skip
    # The adapters take the base weights' dtype (inject_adapter_in_model does not upcast them, unlike
    # get_peft_model); under bf16 DeepSpeed holds their fp32 master copy, as for every other parameter.
    peft.inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER_NAME)


def _matches(name: str, patterns: list[str]) -> set[str]:
    """The patterns that select parameter ``name``: the name itself or any of its modules' names."""
    name = name.replace(f".{BASE_LAYER}", "")  # a LoRA-wrapped layer answers to its base name
    parts = name.split(".")
    candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return {p for p in patterns if any(fnmatch.fnmatchcase(c, p) for c in candidates)}


def apply_trainable(
    module: nn.Module, trainable: TrainableSpec, lora: LoraConfig | None = None, head: HeadRows | None = None
) -> TrainableSummary:
    """Freeze what ``trainable`` does not train, add LoRA adapters / the head-row delta it asks for, in place.

    ``module``: the backbone (``BackboneAdapter.module``). ``head``: its LM head and image rows, needed when
    the image rows train. Raises one ``ConfigError`` for every pattern that matches nothing or LoRA target
    that is not a Linear layer, naming the modules that exist.
    """
    lora = lora or LoraConfig()
    validate_trainable(trainable, lora)
    if trainable == TRAIN_ALL:
        for param in module.parameters():
            param.requires_grad_(True)
        return summarize(module, TRAIN_ALL)

    patterns = _patterns(trainable)
    matched: set[str] = set()
    for name, _ in module.named_parameters():
        matched |= _matches(name, patterns)
    unmatched = [p for p in patterns if p not in matched]
    problems = []
    if unmatched:
        problems.append(
            f"model.trainable: {', '.join(repr(p) for p in unmatched)} match{'es' if len(unmatched) == 1 else ''} no "
            "parameter (patterns are globs, * ? [0-9], on module or parameter names)"
        )
    if uses_lora(trainable):
        if not lora.target_modules:  # an internal order: model/arra.py resolves [] to the backbone's before this
            raise ValueError("apply_trainable needs model.lora.target_modules resolved (arra.resolved_lora)")
        problems += _lora_target_problems(module, lora.target_modules)
    if problems:
        raise ConfigError(
            f"{'; '.join(problems)}. This backbone's modules with parameters: {module_name_summary(module)}; its "
            f"Linear layers (LoRA targets): {', '.join(linear_leaf_names(module))}; keywords in a model.trainable "
            f"list: {', '.join(KEYWORDS)}"
        )
    if trains_image_rows(trainable, lora):
        if head is None:
            raise ConfigError(
                f"image head rows are to be trained ({IMAGE_HEAD_ROWS} / model.lora.train_image_head_rows=true), "
                "but this backbone names no image rows; set model.lora.train_image_head_rows=false"
            )
        if _matches(f"{head.name}.weight", patterns):
            raise ConfigError(
                f"model.trainable: a pattern trains all of {head.name} already; drop {IMAGE_HEAD_ROWS} "
                "(or set model.lora.train_image_head_rows=false)"
            )
    if uses_lora(trainable):
        _apply_lora(module, lora)
    if trains_image_rows(trainable, lora):
        base_head = module.get_submodule(head.name)
        if not isinstance(base_head, LMHeadWithLoss):
            raise TypeError(f"{head.name} is a {type(base_head).__name__}, not the LMHeadWithLoss the backbone builds")
        _set_submodule(module, head.name, LMHeadWithImageRows(base_head, head.row_ids))

    for name, param in module.named_parameters():
        adapter = bool(_LORA_PARAM.search(name)) or name.endswith(f".{DELTA_NAME}")
        param.requires_grad_(adapter or bool(_matches(name, patterns)))
    return summarize(module, TRAIN_LORA if trainable == TRAIN_LORA else "patterns")


def summarize(module: nn.Module, mode: str) -> TrainableSummary:
    total = trainable = lora = rows = 0
    trained: dict[str, None] = {}
    for name, param in module.named_parameters():
        count = getattr(param, "ds_numel", param.numel())  # ZeRO-3: the full size of a partitioned parameter
        total += count
        if _LORA_PARAM.search(name):
            lora += count
        if name.endswith(f".{DELTA_NAME}"):
            rows += count
        if param.requires_grad:
            trainable += count
            trained[_collapse_indices(name.replace(f".{BASE_LAYER}", ""))] = None
    return TrainableSummary(mode, total, trainable, lora, rows, list(trained))


# ------------------------------------------------------------------------------------------------
# merge and export
# ------------------------------------------------------------------------------------------------


def _is_lora_layer(sub: nn.Module) -> bool:
    return hasattr(sub, BASE_LAYER) and hasattr(sub, "lora_A") and hasattr(sub, "merge")


def merge_lora(
    source: nn.Module | Mapping[str, torch.Tensor], lora: LoraConfig | None = None
) -> nn.Module | dict[str, torch.Tensor]:
    """Fold the adapters into plain weights with the base names.

    A module is changed in place and returned: each LoRA layer becomes its base Linear with
    W + B A * alpha / r, the head its plain ``LMHeadWithLoss`` with the delta added to its rows. A state dict
    (``apply_trainable``'s names) gives a new dict; ``lora`` supplies alpha (r is read from the shapes).
    Math in fp32, stored in each base weight's dtype.
    """
    if isinstance(source, nn.Module):
        for name, sub in list(source.named_modules()):
            if _is_lora_layer(sub):
                sub.merge(safe_merge=True)
                _set_submodule(source, name, sub.get_base_layer())
            elif isinstance(sub, LMHeadWithImageRows):
                with torch.no_grad():
                    sub.weight.copy_(sub.effective_weight())
                _set_submodule(source, name, LMHeadWithLoss(sub.weight, sub.z_loss_weight, sub.chunk_size,
                                                            sub.fused_kernels, bias=sub.bias))
        if hasattr(source, "peft_config"):
            del source.peft_config  # set by peft's injection; nothing of peft is left
        return source
    if lora is None:
        raise ValueError("merge_lora(state_dict) needs the LoraConfig (alpha) the adapters were trained with")
    merged: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if _LORA_PARAM.search(key) or key.endswith((f".{DELTA_NAME}", f".{ROW_IDS_NAME}")):
            continue
        base_key = key.replace(f".{BASE_LAYER}.", ".")
        merged[base_key] = value
        prefix = key[: -len(".weight")] if key.endswith(f".{BASE_LAYER}.weight") else None
        if prefix is not None and f"{prefix[: -len(BASE_LAYER) - 1]}.lora_A.{ADAPTER_NAME}.weight" in source:
            layer = prefix[: -len(BASE_LAYER) - 1]
            down = source[f"{layer}.lora_A.{ADAPTER_NAME}.weight"].float()  # [r, in]
            up = source[f"{layer}.lora_B.{ADAPTER_NAME}.weight"].float()  # [out, r]
            merged[base_key] = (value.float() + (up @ down) * (lora.alpha / down.shape[0])).to(value.dtype)
        head = key[: -len(".weight")] if key.endswith(".weight") else None
        if head is not None and f"{head}.{DELTA_NAME}" in source:
            rows = source[f"{head}.{ROW_IDS_NAME}"].long()
            delta = source[f"{head}.{DELTA_NAME}"].float()
            merged[base_key] = value.float().index_add(0, rows, delta).to(value.dtype)
    return merged


def _state(source: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return source.state_dict() if isinstance(source, nn.Module) else source


def adapter_state_dict(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter alone, keyed as peft writes it (``base_model.model.<layer>.lora_A.weight``; the head's
    image rows as ``base_model.model.<head>.token_adapter.trainable_tokens_delta``, which holds the rows'
    trained *values*, base + delta, as peft's trainable tokens do)."""
    state = _state(source)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _LORA_PARAM.search(key):
            out[PEFT_PREFIX + key.replace(f".{ADAPTER_NAME}.weight", ".weight")] = value.detach().clone()
        elif key.endswith(f".{DELTA_NAME}"):
            head = key[: -len(DELTA_NAME) - 1]
            rows = state[f"{head}.{ROW_IDS_NAME}"].long()
            weight = state[f"{head}.weight"]
            values = weight.float()[rows] + value.float()
            out[f"{PEFT_PREFIX}{head}.{PEFT_TOKENS_KEY}"] = values.to(weight.dtype)
    if not out:
        raise ValueError("no LoRA adapter or image-row delta in this model / state dict (model.trainable=lora?)")
    return out


def peft_adapter_config(source: nn.Module | Mapping[str, torch.Tensor], lora: LoraConfig, base_model: str = ""):
    """The ``peft.LoraConfig`` that describes ``source``'s adapters (for ``adapter_config.json``)."""
    import peft  # reason: peft (and its transformers integrations) loads only where LoRA is used

    state = _state(source)
    token_indices = {
        key[: -len(ROW_IDS_NAME) - 1]: [int(i) for i in value.tolist()]
        for key, value in state.items()
        if key.endswith(f".{ROW_IDS_NAME}")
    }
    return peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", trainable_token_indices=token_indices or None, base_model_name_or_path=base_model or None,
    )  # fmt: skip


def write_adapter(
    out_dir: str | Path, source: nn.Module | Mapping[str, torch.Tensor], lora: LoraConfig, base_model: str = ""
) -> Path:
    """Write the adapter alone in peft's format: ``peft.PeftModel.from_pretrained(base, out_dir)`` loads it.

    ``base_model``: recorded as ``base_model_name_or_path`` (the merged export or the original checkpoint).
    """
    from safetensors.torch import save  # reason: only the export writes safetensors bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(source, lora, base_model).to_dict()
    # peft's own save_pretrained writes sets as lists; the enums are str subclasses
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_write_json(out_dir / ADAPTER_CONFIG_FILE, json.loads(json.dumps(config, default=str)))
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(source).items()}
    atomic_write(out_dir / ADAPTER_WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    return out_dir
