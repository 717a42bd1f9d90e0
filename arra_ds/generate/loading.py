"""Load a backbone for generation: an exported Hugging Face directory or a trainer checkpoint.

- HF directory (``config.json`` + weights, e.g. Lumina-mGPT-7B or our export): loaded with
  ``load_backbone`` (``from_pretrained``, local files only), image rows of ``lm_head`` kept.
- Trainer checkpoint (run dir, ``checkpoints/`` or ``checkpoints/step_<n>``): the backbone is built
  from the run's ``config.yaml`` and the ZeRO checkpoint's consolidated weights are loaded into it
  (the alignment projector, a training-only part, is dropped). For a ``chameleon``/``lumina_mgpt``
  run the base directory named in the config must still exist (it supplies config and tokenizer).

The prompt tokenizer: the debug tokenizer for debug models, else ``tokenizer`` if given, else
``tokenizer.json`` in the model (or base model) directory. Its special-token ids must agree with the
model's ``vocabulary_map``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from arra_ds.data.sequence import ConversationTokenizer, load_text_tokenizer
from arra_ds.model.backbone import ModelConfig, load_backbone
from arra_ds.model.vocab import (
    BOS,
    END_OF_TURN,
    IMAGE_END,
    IMAGE_START,
    ROW_END,
    ChameleonVocab,
    build_debug_tokenizer,
    build_debug_vocab,
)
from arra_ds.train.checkpoint_io import consolidated_state_dict, is_trainer_checkpoint, resolve_checkpoint

ALIGN_HEAD_PREFIX = "align_head."
BACKBONE_PREFIX = "backbone."


class ModelLoadError(ValueError):
    pass


@dataclass
class GenerationModel:
    backbone: nn.Module  # ChameleonForConditionalGeneration (no vqmodel), eval mode
    vocab: ChameleonVocab
    tokenizer: object  # tokenizers.Tokenizer for prompt text
    description: dict = field(default_factory=dict)  # what was loaded (for reports)

    def __post_init__(self) -> None:
        self._conversation = ConversationTokenizer(self.tokenizer, self.vocab)

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text -> token ids without <s>/<eot> (the sampler adds that frame back), tokenised
        exactly as pre-tokenization tokenises a human turn."""
        return self._conversation.tokenize([("human", text)]).tokens[1:-1]


def _load_tokenizer(model_cfg: ModelConfig, override: str):
    if override:
        return load_text_tokenizer(override)
    if model_cfg.source == "debug":
        return build_debug_tokenizer(num_image_codes=model_cfg.debug.num_image_codes)
    path = Path(model_cfg.path) / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(
            f"prompt tokenizer {path} not found; pass the Chameleon text tokenizer (tokenizer.json / "
            "text_tokenizer.json) explicitly"
        )
    return load_text_tokenizer(path)


def _check_tokenizer(tokenizer, vocab: ChameleonVocab, where: str) -> None:
    names = (BOS, IMAGE_START, IMAGE_END, ROW_END, END_OF_TURN)
    wrong = [n for n in names if tokenizer.token_to_id(n) != vocab.id(n)]
    if wrong:
        raise ModelLoadError(
            f"tokenizer ids disagree with the model's vocabulary_map for {wrong} ({where}); use the tokenizer "
            "that belongs to this model"
        )


def _run_model_config(config_path: Path) -> ModelConfig:
    from arra_ds.config import RunConfig, from_dict

    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found: the trainer writes the resolved run config there")
    data = yaml.safe_load(config_path.read_text()) or {}
    run_cfg = from_dict(RunConfig, data)
    run_cfg.model.validate()
    return run_cfg.model


def _model_config_for(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig to build the backbone with, description) for an HF dir or a trainer checkpoint."""
    if (path / "config.json").is_file():
        return ModelConfig(source="lumina_mgpt", path=str(path), init_image_head="keep"), {"kind": "hf", "path": str(path)}
    if is_trainer_checkpoint(path):
        ref = resolve_checkpoint(path)
        model_cfg = _run_model_config(ref.run_config_path)
        model_cfg.init_image_head = "keep"  # the checkpoint's weights replace the initial ones
        description = {"kind": "trainer_checkpoint", "path": str(ref.path), "step": ref.step, "source": model_cfg.source}
        return model_cfg, description
    raise ModelLoadError(
        f"{path} is neither a Hugging Face model directory (config.json) nor a trainer checkpoint "
        "(run dir / checkpoints / checkpoints/step_<n>)"
    )


def describe_model(path: str | Path) -> dict:
    """What ``path`` is (kind, resolved checkpoint, step), without loading weights."""
    return _model_config_for(Path(path))[1]


def load_vocab(path: str | Path) -> ChameleonVocab:
    """The token vocabulary of a model, read from its config only (no weights)."""
    model_cfg, _ = _model_config_for(Path(path))
    if model_cfg.source == "debug":
        return build_debug_vocab(num_image_codes=model_cfg.debug.num_image_codes)
    vocabulary_map = json.loads((Path(model_cfg.path) / "config.json").read_text()).get("vocabulary_map")
    if not vocabulary_map:
        raise ModelLoadError(f"{model_cfg.path}/config.json has no vocabulary_map")
    return ChameleonVocab.from_vocabulary_map(vocabulary_map, source=f"{model_cfg.path}/config.json")


def load_for_generation(
    path: str | Path, dtype: torch.dtype, device: torch.device | str, tokenizer: str = ""
) -> GenerationModel:
    path = Path(path)
    model_cfg, description = _model_config_for(path)
    backbone, vocab = load_backbone(model_cfg, dtype=dtype)
    if description["kind"] == "trainer_checkpoint":
        ref = resolve_checkpoint(path)
        state = consolidated_state_dict(ref, dtype=dtype)
        stray = [k for k in state if not k.startswith((BACKBONE_PREFIX, ALIGN_HEAD_PREFIX))]
        if stray:
            raise ModelLoadError(f"checkpoint {ref.path} has unexpected parameters {stray[:5]}: not an arra_ds run?")
        backbone_state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        backbone.load_state_dict(backbone_state, strict=True)
    text_tokenizer = _load_tokenizer(model_cfg, tokenizer)
    _check_tokenizer(text_tokenizer, vocab, str(path))
    backbone.to(device).eval().requires_grad_(False)
    return GenerationModel(backbone, vocab, text_tokenizer, description)
