"""Backbones: Hugging Face Chameleon, Lumina-mGPT, the in-code debug preset, and LlamaGen's c2i GPT.

Single-device code. Under ZeRO-3 the trainer keeps a ``transformers`` ``HfDeepSpeedConfig`` alive
while this runs, so ``from_pretrained`` / ``_from_config`` build the model inside ``zero.Init`` and
no rank ever holds the full weights; a plain ``nn.Module`` backbone (LlamaGen) is built inside the
``partitioned`` context the trainer passes in instead. Weight edits that need the full tensor go
through the ``gather`` context factory (``deepspeed.zero.GatheredParameters`` there, a no-op here);
see ``model/interface.py``.

``build_backbone_adapter(cfg)`` is what the ARRA wrapper uses: the backbone module behind the
``BackboneAdapter`` interface (``ChameleonAdapter`` here, ``LlamaGenAdapter`` in ``model/llamagen.py``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from arra_ds.errors import ConfigError
from arra_ds.kernels import triton_interpreter_enabled
from arra_ds.model.interface import (
    BackboneAdapter,
    GatherContext,
    LMHeadWithLoss,
    PartitionContext,
    SequenceView,
    no_gather,
    no_partitioning,
)
from arra_ds.model.llamagen import LlamaGenConfig, build_llamagen_backbone
from arra_ds.tokens.vocab import ChameleonVocab, VocabError, build_debug_tokenizer

LLAMAGEN_SOURCE = "llamagen"
# model.attn_implementation values LlamaGen's attention honours: it always calls PyTorch SDPA (flash on GPU).
LLAMAGEN_ATTENTION = ("auto", "sdpa")


@dataclass
class DebugModelConfig:
    """Sizes of the tiny Chameleon built in code (CPU runs and tests)."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    num_image_codes: int = 256
    max_position_embeddings: int = 4096
    vocab_size: int = 0  # 0 = the debug vocabulary rounded up to 64; 65536 gives Chameleon's LM-head shape

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.debug.hidden_size={self.hidden_size} must be divisible by "
                f"model.debug.num_attention_heads={self.num_attention_heads}"
            )
        if min(self.hidden_size, self.num_hidden_layers, self.intermediate_size, self.num_image_codes) < 1:
            raise ConfigError("model.debug sizes must all be positive")
        if self.vocab_size < 0:
            raise ConfigError(f"model.debug.vocab_size={self.vocab_size} must be >= 0 (0 = just the debug vocabulary)")


@dataclass
class ModelConfig:
    # debug: tiny model built in code; chameleon: facebook/chameleon-7b layout (text-only generation,
    # image rows of lm_head start at zero); lumina_mgpt: Lumina-mGPT-7B (image generation already);
    # llamagen: LlamaGen's class-conditional GPT from random initialisation (ARRA-Base, class-to-image data).
    source: Literal["debug", "chameleon", "lumina_mgpt", "llamagen"] = "debug"
    path: str = ""  # local checkpoint directory (config.json + weights) for chameleon / lumina_mgpt
    debug: DebugModelConfig = field(default_factory=DebugModelConfig)
    llamagen: LlamaGenConfig = field(default_factory=LlamaGenConfig)  # sizes of source=llamagen (size B / L / XL or dims)
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

    @property
    def class_conditional(self) -> bool:
        """Does the backbone draw images for class labels (class-to-image data) rather than for text?"""
        return self.source == LLAMAGEN_SOURCE

    def validate(self) -> None:
        if self.source == "debug":
            self.debug.validate()
        elif self.source == LLAMAGEN_SOURCE:
            self.llamagen.validate()
            if self.path:
                raise ConfigError(
                    f"model.path={self.path} is not used by model.source=llamagen (trained from random initialisation, "
                    "sized by model.llamagen.*); remove model.path"
                )
            if self.attn_implementation not in LLAMAGEN_ATTENTION:
                raise ConfigError(
                    f"model.attn_implementation={self.attn_implementation}: LlamaGen's attention always runs PyTorch SDPA "
                    f"(its flash backend on GPU); use one of {list(LLAMAGEN_ATTENTION)}"
                )
        else:
            if not self.path:
                raise ConfigError(
                    f"model.source={self.source} needs model.path=<local checkpoint dir> "
                    "(a directory with config.json and the weights; nothing is downloaded)"
                )
            config_json = Path(self.path) / "config.json"
            if not config_json.is_file():
                raise ConfigError(f"model.path={self.path}: no config.json there; point it at the checkpoint directory")
        if self.lm_loss_chunk_size < 1:
            raise ConfigError(f"model.lm_loss_chunk_size={self.lm_loss_chunk_size} must be >= 1")
        if self.z_loss_weight < 0:
            raise ConfigError(f"model.z_loss_weight={self.z_loss_weight} must be >= 0")
        for key in ("attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")
        if self.fused_kernels == "on" and not torch.cuda.is_available() and not triton_interpreter_enabled():
            raise ConfigError(
                "model.fused_kernels=on needs a CUDA device (Triton kernels); on CPU use model.fused_kernels=auto "
                "or off, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter"
            )

    def _hf_config_dict(self) -> dict:
        return json.loads((Path(self.path) / "config.json").read_text())

    def num_hidden_layers(self) -> int:
        if self.source == "debug":
            return self.debug.num_hidden_layers
        if self.source == LLAMAGEN_SOURCE:
            return self.llamagen.resolved_n_layer
        return int(self._hf_config_dict()["num_hidden_layers"])

    def hidden_size(self) -> int:
        if self.source == "debug":
            return self.debug.hidden_size
        if self.source == LLAMAGEN_SOURCE:
            return self.llamagen.resolved_dim
        return int(self._hf_config_dict()["hidden_size"])

    def max_positions(self) -> int:
        """The longest data sequence (tokens of one sample) the backbone takes; 0 = unknown."""
        if self.source == "debug":
            return self.debug.max_position_embeddings
        if self.source == LLAMAGEN_SOURCE:
            return self.llamagen.block_size  # a sample is the image's codes; the class token is added by the model
        return int(self._hf_config_dict().get("max_position_embeddings", 0))

    def zero_image_head(self) -> bool:
        if self.init_image_head == "auto":
            return self.source == "chameleon"
        return self.init_image_head == "zero"


def resolve_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class ResidualDropout:
    """Forward hook: dropout on a residual branch's output, only while its module is in training mode.

    Lumina-mGPT's Chameleon (the model the ARRA reference trains) computes each decoder layer as

        h = x + dropout(attn(norm1(x)));   out = h + dropout(mlp(norm2(h)))

    (swin-norm layers: ``x + dropout(norm1(attn(x)))``, ``h + dropout(norm2(mlp(h)))``). Stock HF
    Chameleon has no such dropout; this hook on the branch's last module (``self_attn`` / ``mlp``, or
    the two norms in swin-norm layers) gives the same computation without forking the HF model file.
    Under activation checkpointing the hook runs inside the checkpointed layer, and torch's checkpoint
    (``preserve_rng_state=True``) restores the RNG state for the recompute, so backward sees the masks
    of the forward pass.
    """

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: nn.Module, inputs, output):
        if not module.training:
            return None  # eval / generation: the output passes through untouched
        if isinstance(output, tuple):  # self_attn returns (attn_output [B, T, H], attn_weights)
            return (F.dropout(output[0], self.p, training=True), *output[1:])
        return F.dropout(output, self.p, training=True)


def residual_branch_outputs(model: ChameleonForConditionalGeneration) -> list[nn.Module]:
    """Per decoder layer, the two modules whose outputs are added to the residual stream."""
    modules = []
    for layer in model.model.layers:
        if model.config.swin_norm:  # the norm comes after the branch: it is the branch's last module
            modules += [layer.input_layernorm, layer.post_attention_layernorm]
        else:
            modules += [layer.self_attn, layer.mlp]
    return modules


def add_residual_dropout(model: ChameleonForConditionalGeneration, p: float) -> None:
    """Lumina-mGPT's residual dropout ``p`` on every decoder layer (see ``ResidualDropout``)."""
    if p <= 0:
        return  # nothing registered: the model is stock HF Chameleon
    for module in residual_branch_outputs(model):
        module.register_forward_hook(ResidualDropout(p))


def debug_chameleon_config(cfg: DebugModelConfig, attn_implementation: str) -> ChameleonConfig:
    tokenizer = build_debug_tokenizer(num_image_codes=cfg.num_image_codes)
    vocabulary_map = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = -(-len(vocabulary_map) // 64) * 64  # round up: friendlier matmul shapes
    if cfg.vocab_size:
        if cfg.vocab_size < len(vocabulary_map):
            raise ConfigError(
                f"model.debug.vocab_size={cfg.vocab_size} is smaller than the debug vocabulary ({len(vocabulary_map)}); "
                "use 0 (the debug vocabulary rounded up to 64) or a larger size"
            )
        vocab_size = cfg.vocab_size
    # A tiny VQ config: Chameleon's default would build a 70M-parameter VQGAN we drop anyway.
    vq_config = dict(
        embed_dim=32, num_embeddings=cfg.num_image_codes, latent_channels=32, resolution=32, in_channels=3,
        base_channels=32, channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    )
    return ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        vocabulary_map=vocabulary_map,
        vq_config=vq_config,
        pad_token_id=vocabulary_map["<pad>"],
        bos_token_id=vocabulary_map["<s>"],
        eos_token_id=vocabulary_map["</s>"],
        attn_implementation=attn_implementation,
    )


def backbone_config(cfg: ModelConfig, attn_implementation: str = "sdpa") -> ChameleonConfig:
    """The Hugging Face config of the backbone ``cfg`` describes (the debug preset is built in code)."""
    if cfg.source == LLAMAGEN_SOURCE:
        raise ConfigError(
            "model.source=llamagen is LlamaGen's class-conditional GPT, not a Hugging Face Chameleon model: "
            "sample and evaluate it with launch/eval_c2i.py"
        )
    if cfg.source == "debug":
        hf_config = debug_chameleon_config(cfg.debug, attn_implementation)
    else:
        hf_config = ChameleonConfig.from_pretrained(cfg.path, local_files_only=True)
        hf_config._attn_implementation = attn_implementation
    hf_config.attention_dropout = cfg.attention_dropout
    return hf_config


def _vocab_of(config: ChameleonConfig, source: str) -> ChameleonVocab:
    vocab = ChameleonVocab.from_model_config(config)
    if vocab.vocab_size > config.vocab_size:
        raise VocabError(
            f"{source}: vocabulary_map has ids up to {vocab.vocab_size - 1} but the model's vocab_size is "
            f"{config.vocab_size}; the config.json does not belong to these weights"
        )
    return vocab


def _as_arra_backbone(model: ChameleonForConditionalGeneration, cfg: ModelConfig) -> ChameleonForConditionalGeneration:
    """Drop the VQ model (pre-tokenised data never needs it) and give the LM head its fused loss."""
    if hasattr(model.model, "vqmodel"):
        del model.model.vqmodel
    model.config.use_cache = False
    model.lm_head = LMHeadWithLoss(model.lm_head.weight, cfg.z_loss_weight, cfg.lm_loss_chunk_size, cfg.fused_kernels)
    return model


def skeleton_like(hf_config: ChameleonConfig, dtype: torch.dtype, cfg: ModelConfig | None = None) -> ChameleonForConditionalGeneration:
    """A backbone of ``hf_config`` with its parameters on the meta device, shaped as ``load_backbone`` builds it (no vqmodel,
    ``LMHeadWithLoss`` head): the module a checkpoint's tensors are assigned or copied into."""
    # parameters on the meta device, buffers (rotary frequencies, not in any state dict) real
    with init_empty_weights(include_buffers=False):
        model = ChameleonForConditionalGeneration._from_config(hf_config, dtype=dtype)
    return _as_arra_backbone(model, cfg or ModelConfig())


def build_backbone_skeleton(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> tuple[ChameleonForConditionalGeneration, ChameleonVocab]:
    """(backbone of ``cfg`` on the meta device, vocab); see ``skeleton_like``."""
    hf_config = backbone_config(cfg, resolve_attn_implementation(cfg.attn_implementation))
    model = skeleton_like(hf_config, dtype, cfg)
    return model, _vocab_of(model.config, cfg.path or "debug model")


def load_backbone(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    gather: GatherContext = no_gather,
) -> tuple[ChameleonForConditionalGeneration, ChameleonVocab]:
    """Build (debug: random init) or load (from_pretrained) the Chameleon backbone; returns (model, vocab).

    The returned model has no ``vqmodel`` and its ``lm_head`` is an ``LMHeadWithLoss``. Image-token
    logits are never masked (we do not call HF's forward). With ``cfg.residual_dropout`` > 0 its decoder
    layers carry ``ResidualDropout`` hooks, active in training mode only.
    """
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.source == "debug":
        hf_config = backbone_config(cfg, attn)
        # Build without padding_idx: under zero.Init the embedding is already partitioned when HF's
        # init zeroes the padding row, which then fails. The pad row gets no gradient either way
        # (padded positions are masked out of attention and carry label -100).
        pad_id = hf_config.pad_token_id
        hf_config.pad_token_id = None
        model = ChameleonForConditionalGeneration._from_config(hf_config, dtype=dtype)
        model.config.pad_token_id = pad_id
    else:
        model = ChameleonForConditionalGeneration.from_pretrained(
            cfg.path,
            dtype=dtype,
            attn_implementation=attn,
            attention_dropout=cfg.attention_dropout,
            local_files_only=True,
            use_safetensors=None,
        )
    model = _as_arra_backbone(model, cfg)
    vocab = _vocab_of(model.config, cfg.path or "debug model")

    if cfg.zero_image_head():
        # Chameleon-7B was released without image generation: its image rows are untrained. Start
        # them at zero so that all image codes begin equally likely (Lumina-mGPT's recipe).
        weight = model.lm_head.weight
        with gather([weight]), torch.no_grad():
            weight[vocab.image_token_ids.to(weight.device)] = 0.0

    add_residual_dropout(model, cfg.residual_dropout)
    if cfg.activation_checkpointing:
        # non-reentrant checkpoint with preserve_rng_state (default True): dropout masks replay in recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, vocab


class ChameleonAdapter(BackboneAdapter):
    """A ``ChameleonForConditionalGeneration`` as ``load_backbone`` builds it (debug, Chameleon, Lumina-mGPT)."""

    def __init__(self, module: ChameleonForConditionalGeneration, vocab: ChameleonVocab):
        super().__init__(module, vocab)

    @property
    def hidden_size(self) -> int:
        return self.module.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.module.config.num_hidden_layers

    @property
    def initializer_range(self) -> float:
        return float(self.module.config.initializer_range)

    @property
    def vocab_size(self) -> int:
        return self.module.config.vocab_size

    @property
    def image_token_ids(self) -> torch.Tensor:
        return self.vocab.image_token_ids

    @property
    def image_start_id(self) -> int:
        return self.vocab.image_start_id

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def lm_head(self) -> LMHeadWithLoss:
        return self.module.lm_head

    @property
    def input_embedding(self) -> nn.Parameter:
        return self.module.model.embed_tokens.weight

    def layer_output(self, layer: int) -> nn.Module:
        # hidden_states[L] in HF is the output of layers[L-1], except the last entry, which is taken
        # after the final norm.
        model = self.module.model
        return model.norm if layer == self.num_layers else model.layers[layer - 1]

    def run(self, batch: dict) -> SequenceView:
        input_ids = batch["input_ids"]  # [B, T]
        hidden = self.module.model(
            input_ids=input_ids, attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state  # [B, T, H]
        return SequenceView(input_ids=input_ids, labels=batch["labels"], hidden=hidden[:, :-1])


def build_backbone_adapter(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    gather: GatherContext = no_gather,
    partitioned: PartitionContext = no_partitioning,
) -> BackboneAdapter:
    """The backbone ``cfg`` describes, built (random init) or loaded, behind the ARRA interface."""
    if cfg.source == LLAMAGEN_SOURCE:
        return build_llamagen_backbone(
            cfg.llamagen,
            z_loss_weight=cfg.z_loss_weight,
            lm_loss_chunk_size=cfg.lm_loss_chunk_size,
            fused_kernels=cfg.fused_kernels,
            activation_checkpointing=cfg.activation_checkpointing,
            dtype=dtype,
            gather=gather,
            partitioned=partitioned,
        )
    return ChameleonAdapter(*load_backbone(cfg, dtype=dtype, gather=gather))
