"""``ModelConfig``: the ``model`` section of a run config. Which backbone (``source``, looked up in the registry),
its own section (``debug``, ``llamagen``, ``janus``), and the keys every backbone shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from arra_ds.errors import ConfigError
from arra_ds.kernels import triton_interpreter_enabled
from arra_ds.model.debug import DebugModelConfig
from arra_ds.model.interface import Backbone, BackboneShape
from arra_ds.model.janus import JanusModelConfig
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.model.registry import backbone_for
from arra_ds.model.trainable import LoraConfig, TrainableSpec, validate_trainable


@dataclass
class ModelConfig:
    # the backbone (model/registry.py): debug = a tiny model built in code; chameleon = facebook/chameleon-7b
    # layout (text-only generation, image rows of lm_head start at zero); lumina_mgpt = Lumina-mGPT-7B (draws
    # images already); llamagen = LlamaGen's class-conditional GPT from random initialisation (ARRA-Base);
    # janus = Janus-Pro-1B / -7B in the transformers layout (model/janus.py)
    source: str = "debug"  # a registered backbone: debug, chameleon, lumina_mgpt, llamagen, janus (model/registry.py)
    path: str = ""  # local checkpoint directory (config.json + weights) for chameleon / lumina_mgpt / janus
    debug: DebugModelConfig = field(default_factory=DebugModelConfig)
    llamagen: LlamaGenConfig = field(default_factory=LlamaGenConfig)  # sizes of source=llamagen (size B / L / XL or dims)
    janus: JanusModelConfig = field(default_factory=JanusModelConfig)  # source=janus: prompt dropout for CFG
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    activation_checkpointing: bool = False
    z_loss_weight: float = 0.0
    # auto: zero for source=chameleon (as Lumina-mGPT does from the text-only model), keep otherwise.
    init_image_head: Literal["auto", "zero", "keep"] = "auto"
    lm_loss_chunk_size: int = 2048  # rows of the chunked LM-head loss; memory ~ chunk * vocab * 4 B
    attention_dropout: float = 0.0  # HF's dropout on the attention probabilities
    # Lumina-mGPT's `dropout`: on the attention and MLP outputs of every decoder layer, before they are
    # added to the residual stream (training only; the ARRA reference trains with 0.05). 0 = stock HF.
    residual_dropout: float = 0.0
    # Triton kernels (kernels/) for the LM-head loss and the alignment projector + loss.
    # auto: for CUDA tensors; on: always (CPU only under TRITON_INTERPRET=1, for tests); off: torch.
    fused_kernels: Literal["auto", "on", "off"] = "auto"
    # What is trained (model/trainable.py): all (the paper), lora (adapters per model.lora.*), or a list of
    # glob patterns on the backbone's module / parameter names, e.g. [lm_head, "model.layers.[0-3].*"]
    # (keywords in the list: lora, image_head_rows). The alignment projector always trains.
    trainable: TrainableSpec = "all"  # all, lora, or [pattern, ...] (globs on module / parameter names)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA rank / alpha / dropout / targets / head rows

    @property
    def backbone(self) -> Backbone:
        return backbone_for(self.source)

    @property
    def class_conditional(self) -> bool:
        """Does the backbone draw images for class labels (class-to-image data) rather than for text?"""
        return self.backbone.condition == "class"

    def shape(self) -> BackboneShape:
        return self.backbone.shape(self)

    def validate(self) -> None:
        self.backbone.validate(self)
        if self.lm_loss_chunk_size < 1:
            raise ConfigError(f"model.lm_loss_chunk_size={self.lm_loss_chunk_size} must be >= 1")
        if self.z_loss_weight < 0:
            raise ConfigError(f"model.z_loss_weight={self.z_loss_weight} must be >= 0")
        validate_trainable(self.trainable, self.lora)
        for key in ("attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")
        if self.fused_kernels == "on" and not torch.cuda.is_available() and not triton_interpreter_enabled():
            raise ConfigError(
                "model.fused_kernels=on needs a CUDA device (Triton kernels); on CPU use model.fused_kernels=auto "
                "or off, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter"
            )
