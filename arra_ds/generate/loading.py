"""What a ``model=`` path is, and loading it for generation, for any backbone.

- A trainer checkpoint (run dir, ``checkpoints/`` or ``checkpoints/step_<n>``): the run's ``model`` section (reading
  the copies of the base checkpoint's config and tokenizer in the run's ``assets/``) and the consolidated weights
  (``arra_ds.checkpoints.load_trained_backbone``; the training-only projector is dropped).
- A model from elsewhere that a registered backbone recognises (``Backbone.claims``): a Hugging Face Chameleon
  directory (Lumina-mGPT, or an export of a trained run) or a released LlamaGen file. Settings such a file does
  not carry (LlamaGen's sizes) come from the ``backbone`` section of the generation config.

The prompt tokenizer of a text-conditional model is the backbone's (``tokenizer=`` overrides it); its
special-token ids must agree with the model's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from arra_ds.checkpoints import is_trainer_checkpoint, load_trained_backbone, read_run_model_config, resolve_checkpoint
from arra_ds.errors import UserError
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import Backbone
from arra_ds.model.registry import registered_backbones
from arra_ds.tokens.vocab import ChameleonVocab

CLAIM_KIND = "kind"  # the key of a backbone's claim that names what the path is (for reports)


class ModelLoadError(UserError, ValueError):
    """A model path that is neither a trainer checkpoint nor a model a registered backbone recognises."""


@dataclass
class ModelRef:
    """What a ``model=`` path is, read without loading weights."""

    path: Path
    model_cfg: ModelConfig
    description: dict  # what was found, for reports: kind, path, step, source

    @property
    def backbone(self) -> Backbone:
        return self.model_cfg.backbone

    @property
    def is_trainer_checkpoint(self) -> bool:
        return self.description["kind"] == "trainer_checkpoint"

    def vocab(self) -> ChameleonVocab | None:
        """The text vocabulary, from the config alone (None for a class-conditional model)."""
        return self.backbone.vocab(self.model_cfg)


def resolve_model(path: str | Path, backbone_section: ModelConfig | None = None) -> ModelRef:
    """``path`` as a trainer checkpoint or as a model some backbone recognises; ``backbone_section`` supplies the
    model settings a recognised file does not carry."""
    path = Path(path)
    if is_trainer_checkpoint(path):
        ref = resolve_checkpoint(path)
        model_cfg = read_run_model_config(ref.run_dir)
        description = {"kind": "trainer_checkpoint", "path": str(ref.path), "step": ref.step, "source": model_cfg.source}
        return ModelRef(path, model_cfg, description)
    if not path.exists():
        raise ModelLoadError(f"model={path}: no such run directory, checkpoint or model")
    for backbone in registered_backbones():
        claim = backbone.claims(path)
        if claim is not None:
            claim = dict(claim)
            kind = claim.pop(CLAIM_KIND, "pretrained")
            model_cfg = replace(backbone_section or ModelConfig(), **claim)
            model_cfg.validate()
            return ModelRef(path, model_cfg, {"kind": kind, "path": str(path), "step": None, "source": model_cfg.source})
    raise ModelLoadError(
        f"{path} is neither a trainer checkpoint (run dir / checkpoints / checkpoints/step_<n>) nor a model a "
        f"registered backbone recognises ({', '.join(b.name for b in registered_backbones())}): a Hugging Face "
        "Chameleon directory with config.json, or a LlamaGen .pt file"
    )


def describe_model(path: str | Path, backbone_section: ModelConfig | None = None) -> dict:
    """What ``path`` is (kind, resolved checkpoint, step, source), without loading weights."""
    return resolve_model(path, backbone_section).description


@dataclass
class GenerationModel:
    """A loaded model: its backbone entry, the module (eval mode, on its device), its text vocabulary and prompt
    tokenizer (None for a class-conditional model)."""

    ref: ModelRef
    module: nn.Module
    vocab: ChameleonVocab | None
    tokenizer: object | None
    description: dict = field(default_factory=dict)

    @property
    def backbone(self) -> Backbone:
        return self.ref.backbone

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text -> token ids without the frame the stepper adds, tokenised exactly as pre-tokenization
        tokenises a human turn."""
        return self.backbone.encode_prompt(self.tokenizer, self.vocab, text)


def load_for_generation(ref: ModelRef, dtype: torch.dtype, device: torch.device | str, tokenizer: str = "") -> GenerationModel:
    if ref.is_trainer_checkpoint:
        module, vocab, _ = load_trained_backbone(ref.path, dtype, device)
    else:
        module = ref.backbone.load_pretrained(ref.model_cfg, ref.path, dtype).to(device).eval().requires_grad_(False)
        vocab = ref.vocab()
    text_tokenizer = ref.backbone.text_tokenizer(ref.model_cfg, tokenizer) if vocab is not None else None
    return GenerationModel(ref, module, vocab, text_tokenizer, ref.description)
