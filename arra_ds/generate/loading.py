"""Load a backbone for generation: an exported Hugging Face directory or a trainer checkpoint.

- HF directory (``config.json`` + weights, e.g. Lumina-mGPT-7B or our export): loaded with
  ``load_backbone`` (``from_pretrained``, local files only), image rows of ``lm_head`` kept.
- Trainer checkpoint (run dir, ``checkpoints/`` or ``checkpoints/step_<n>``):
  ``arra_ds.checkpoints.load_trained_backbone`` (the run's ``model`` section + the consolidated
  weights; the training-only projector is dropped). For a ``chameleon``/``lumina_mgpt`` run the base
  directory named in the config must still exist (it supplies config and tokenizer).

The prompt tokenizer: the debug tokenizer for debug models, else ``tokenizer`` if given, else
``tokenizer.json`` in the model (or base model) directory. Its special-token ids must agree with the
model's ``vocabulary_map``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from arra_ds.checkpoints import (
    is_trainer_checkpoint,
    load_trained_backbone,
    read_run_model_config,
    resolve_checkpoint,
)
from arra_ds.errors import UserError
from arra_ds.model.backbone import ModelConfig, load_backbone
from arra_ds.tokens.conversation import ConversationTokenizer, load_text_tokenizer
from arra_ds.tokens.vocab import (
    BOS,
    END_OF_TURN,
    IMAGE_END,
    IMAGE_START,
    ROW_END,
    ChameleonVocab,
    build_debug_tokenizer,
    build_debug_vocab,
)

HF_CONFIG_FILE = "config.json"


class ModelLoadError(UserError, ValueError):
    """A model path that is neither an HF directory nor a trainer checkpoint, or a mismatched tokenizer."""


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


def _model_config_for(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig of the backbone, description) for an HF dir or a trainer checkpoint."""
    if (path / HF_CONFIG_FILE).is_file():
        return ModelConfig(source="lumina_mgpt", path=str(path), init_image_head="keep"), {"kind": "hf", "path": str(path)}
    if is_trainer_checkpoint(path):
        ref = resolve_checkpoint(path)
        model_cfg = read_run_model_config(ref.run_dir)
        if model_cfg.class_conditional:
            raise ModelLoadError(
                f"{path} is a class-conditional model (model.source={model_cfg.source}): sample and evaluate it with "
                "launch/eval_c2i.py"
            )
        description = {"kind": "trainer_checkpoint", "path": str(ref.path), "step": ref.step, "source": model_cfg.source}
        return model_cfg, description
    raise ModelLoadError(
        f"{path} is neither a Hugging Face model directory ({HF_CONFIG_FILE}) nor a trainer checkpoint "
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
    vocabulary_map = json.loads((Path(model_cfg.path) / HF_CONFIG_FILE).read_text()).get("vocabulary_map")
    if not vocabulary_map:
        raise ModelLoadError(f"{model_cfg.path}/{HF_CONFIG_FILE} has no vocabulary_map")
    return ChameleonVocab.from_vocabulary_map(vocabulary_map, source=f"{model_cfg.path}/{HF_CONFIG_FILE}")


def load_for_generation(
    path: str | Path, dtype: torch.dtype, device: torch.device | str, tokenizer: str = ""
) -> GenerationModel:
    path = Path(path)
    model_cfg, description = _model_config_for(path)
    if description["kind"] == "trainer_checkpoint":
        backbone, vocab, _ = load_trained_backbone(path, dtype, device)
    else:
        backbone, vocab = load_backbone(model_cfg, dtype=dtype)
        backbone.to(device).eval().requires_grad_(False)
    text_tokenizer = _load_tokenizer(model_cfg, tokenizer)
    _check_tokenizer(text_tokenizer, vocab, str(path))
    return GenerationModel(backbone, vocab, text_tokenizer, description)
