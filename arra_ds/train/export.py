"""Export a training checkpoint as a plain Hugging Face Chameleon model directory.

ARRA's projector ``A_phi`` (``align_head.*``) exists only for training: the export keeps the
backbone alone, as the paper does at inference, so the result is an ordinary
``ChameleonForConditionalGeneration`` checkpoint (``config.json`` with the ``vocabulary_map``,
safetensors shards, tokenizer files) that stock ``transformers`` loads with ``from_pretrained``.

Parameter names: ``ARRAModel`` holds the backbone under ``backbone.``, whose names are exactly
Hugging Face's (``model.embed_tokens.weight``, ``model.layers.N...``, ``lm_head.weight``), so the
prefix is stripped and nothing is renamed. The VQ image tokenizer (``model.vqmodel.*``) is not
trained; its weights are copied from the source checkpoint when it has them (the debug model and
Chameleon-7B/Lumina-mGPT directories without them leave it to ``from_pretrained``'s
initialisation, and image decoding uses the separate VQGAN checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from arra_ds.model.backbone import ModelConfig, debug_chameleon_config
from arra_ds.train.checkpoint import CheckpointError
from arra_ds.train.checkpoint_io import consolidated_state_dict, resolve_checkpoint

BACKBONE_PREFIX = "backbone."
PROJECTOR_PREFIX = "align_head."
VQ_PREFIX = "model.vqmodel."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def backbone_config(model_cfg: ModelConfig) -> ChameleonConfig:
    """The Hugging Face config of the trained backbone (what ``load_backbone`` built or loaded)."""
    if model_cfg.source == "debug":
        return debug_chameleon_config(model_cfg.debug, attn_implementation="sdpa")
    return ChameleonConfig.from_pretrained(model_cfg.path, local_files_only=True)


def split_backbone(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ARRAModel state dict -> (Hugging Face backbone state dict, dropped projector keys)."""
    backbone, dropped = {}, []
    for name, tensor in state.items():
        if name.startswith(BACKBONE_PREFIX):
            backbone[name[len(BACKBONE_PREFIX) :]] = tensor
        elif name.startswith(PROJECTOR_PREFIX):
            dropped.append(name)
        else:
            raise CheckpointError(
                f"unexpected parameter {name!r} in the checkpoint: an ARRAModel has only {BACKBONE_PREFIX}* and "
                f"{PROJECTOR_PREFIX}* parameters"
            )
    return backbone, dropped


def source_vq_weights(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``model.vqmodel.*`` tensors of the source checkpoint's safetensors files (empty if it has none)."""
    if model_cfg.source == "debug":
        return {}
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(model_cfg.path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(VQ_PREFIX):
                    tensors[name] = f.get_tensor(name)
    return tensors


def _write_tokenizer(model_cfg: ModelConfig, out_dir: Path) -> list[str]:
    if model_cfg.source == "debug":
        from transformers import PreTrainedTokenizerFast

        from arra_ds.model.vocab import build_debug_tokenizer

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=build_debug_tokenizer(num_image_codes=model_cfg.debug.num_image_codes),
            bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        )
        tokenizer.save_pretrained(str(out_dir))
        return ["tokenizer.json"]
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(model_cfg.path) / name).is_file():
            shutil.copy2(Path(model_cfg.path) / name, out_dir / name)
            copied.append(name)
    return copied


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, run_config=None) -> dict:
    """Write ``out_dir`` as a Hugging Face Chameleon model from a training checkpoint.

    ``checkpoint``: a run directory, its ``checkpoints`` directory or one ``step_<n>`` directory.
    ``dtype``: weights dtype in the export (None keeps the fp32 master weights).
    ``run_config``: the RunConfig the checkpoint was trained with (default: the run's config.yaml).
    Returns a summary (also written to ``out_dir/arra_export.json``).
    """
    from arra_ds.config import load_config

    ref = resolve_checkpoint(checkpoint)
    if run_config is None:
        if not ref.run_config_path.is_file():
            raise CheckpointError(
                f"{ref.run_config_path} not found: pass the run config the checkpoint was trained with (--config)"
            )
        run_config = load_config(ref.run_config_path)
    hf_config = backbone_config(run_config.model)
    backbone, dropped = split_backbone(consolidated_state_dict(ref, dtype))
    vq = {k: (v.to(dtype) if dtype is not None else v) for k, v in source_vq_weights(run_config.model).items()}
    backbone.update(vq)

    with torch.device("meta"):
        skeleton = ChameleonForConditionalGeneration(hf_config)
    expected = set(skeleton.state_dict())
    missing = sorted(k for k in expected - set(backbone) if not k.startswith(VQ_PREFIX))
    unexpected = sorted(set(backbone) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ref.path} does not match the Chameleon architecture of its run config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    if dtype is not None:
        hf_config.torch_dtype = dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skeleton.config = hf_config
    skeleton.save_pretrained(str(out_dir), state_dict=backbone, safe_serialization=True, max_shard_size="5GB")
    tokenizer_files = _write_tokenizer(run_config.model, out_dir)
    summary = {
        "checkpoint": str(ref.path),
        "step": ref.step,
        "parameters": int(sum(t.numel() for t in backbone.values())),
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "dropped": dropped,
        "vq_weights": "copied from the source checkpoint" if vq else "not included (from_pretrained initialises them)",
        "tokenizer": tokenizer_files,
    }
    (out_dir / "arra_export.json").write_text(json.dumps(summary, indent=2))
    return summary
