"""Export a training checkpoint as a plain Hugging Face Chameleon model directory.

ARRA's projector ``A_phi`` (``align_head.*``) exists only for training: the export keeps the
backbone alone, as the paper does at inference, so the result is an ordinary
``ChameleonForConditionalGeneration`` checkpoint (``config.json`` with the ``vocabulary_map``,
safetensors shards, tokenizer files) that stock ``transformers`` loads with ``from_pretrained``.

Parameter names: ``ARRAModel`` holds the backbone under ``backbone.``, whose names are exactly
Hugging Face's (``model.embed_tokens.weight``, ``model.layers.N...``, ``lm_head.weight``), so the
prefix is stripped and nothing is renamed. The VQ image tokenizer (``model.vqmodel.*``) is not
trained; its weights are copied from the source checkpoint when it has them. The debug model's tiny
``vqmodel`` exists only because every Chameleon has one: the export holds its seeded initial weights,
so stock ``from_pretrained`` finds every tensor it expects and initialises (and warns about) none.
(Chameleon-7B / Lumina-mGPT directories without VQ weights leave them to ``from_pretrained``.)
Images are tokenised and decoded with the VQGAN the data was pre-tokenised with: the run's data
record (``arra_data.json``, which names it) is copied into the export, so generation from the export
needs no more arguments than generation from the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from arra_ds.checkpoints import RUN_DATA_FILE, CheckpointError, read_trained_backbone
from arra_ds.model.backbone import ModelConfig, backbone_config
from arra_ds.tokens.vocab import BOS, EOS, PAD, build_debug_tokenizer
from arra_ds.tokens.vqgan import HF_VQ_PREFIX

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
DEBUG_VQ_SEED = 0


def debug_vq_weights(hf_config: ChameleonConfig) -> dict[str, torch.Tensor]:
    """``model.vqmodel.*`` of the debug model: the tiny VQ of its config, initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEBUG_VQ_SEED)
        vqmodel = ChameleonVQVAE(hf_config.vq_config)
    return {f"{HF_VQ_PREFIX}{name}": tensor.detach().contiguous() for name, tensor in vqmodel.state_dict().items()}


def source_vq_weights(model_cfg: ModelConfig, hf_config: ChameleonConfig) -> dict[str, torch.Tensor]:
    """``model.vqmodel.*`` tensors of the source checkpoint's safetensors files (empty if it has none)."""
    if model_cfg.source == "debug":
        return debug_vq_weights(hf_config)
    tensors = {}
    for path in sorted(Path(model_cfg.path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(HF_VQ_PREFIX):
                    tensors[name] = f.get_tensor(name)
    return tensors


def _write_tokenizer(model_cfg: ModelConfig, out_dir: Path) -> list[str]:
    if model_cfg.source == "debug":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=build_debug_tokenizer(num_image_codes=model_cfg.debug.num_image_codes),
            bos_token=BOS, eos_token=EOS, pad_token=PAD,
        )
        tokenizer.save_pretrained(str(out_dir))
        return ["tokenizer.json"]
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(model_cfg.path) / name).is_file():
            shutil.copy2(Path(model_cfg.path) / name, out_dir / name)
            copied.append(name)
    return copied


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> dict:
    """Write ``out_dir`` as a Hugging Face Chameleon model from a training checkpoint.

    ``checkpoint``: a run directory, its ``checkpoints`` directory or one ``step_<n>`` directory; only
    the ``model`` section of the run's config.yaml is read (the training data need not be there).
    ``dtype``: weights dtype in the export (None keeps the fp32 master weights).
    Returns a summary (also written to ``out_dir/arra_export.json``).
    """
    trained = read_trained_backbone(checkpoint, dtype)
    ref, model_cfg, backbone, dropped = trained.ref, trained.model_cfg, trained.state_dict, trained.dropped
    hf_config = backbone_config(model_cfg)
    vq = {k: (v.to(dtype) if dtype is not None else v) for k, v in source_vq_weights(model_cfg, hf_config).items()}
    backbone.update(vq)

    with torch.device("meta"):
        skeleton = ChameleonForConditionalGeneration(hf_config)
    expected = set(skeleton.state_dict())
    missing = sorted(k for k in expected - set(backbone) if not k.startswith(HF_VQ_PREFIX))
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
    tokenizer_files = _write_tokenizer(model_cfg, out_dir)
    data_record = ref.run_dir / RUN_DATA_FILE
    if data_record.is_file():
        shutil.copy2(data_record, out_dir / RUN_DATA_FILE)
    summary = {
        "checkpoint": str(ref.path),
        "step": ref.step,
        "parameters": int(sum(t.numel() for t in backbone.values())),
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "dropped": dropped,
        "vq_weights": (
            "the debug model's tiny vqmodel (seeded initial weights)" if model_cfg.source == "debug"
            else "copied from the source checkpoint" if vq else "not included (from_pretrained initialises them)"
        ),
        "tokenizer": tokenizer_files,
        "data_record": RUN_DATA_FILE if data_record.is_file() else None,
    }
    (out_dir / "arra_export.json").write_text(json.dumps(summary, indent=2))
    return summary
