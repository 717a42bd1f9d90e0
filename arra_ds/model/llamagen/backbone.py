"""The LlamaGen registry entry (``model.source=llamagen``, ARRA-Base): the training adapter, the sampling hooks, the
VQ-16 decoder and the export, around ``LlamaGenGPT`` (``model/llamagen/gpt.py``).

Sampling follows LlamaGen's ``autoregressive/models/generate.py``: the unconditional rows (the null class) run in
the same batch as the conditional ones and are fed the same codes:

    rows 0..B-1     [class_b]    code_0 ... code_{T-1}
    rows B..2B-1    [null class] (the same codes)
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
from accelerate import init_empty_weights
from torch import nn

from arra_ds.config import load_dataclass_config
from arra_ds.errors import ConfigError
from arra_ds.model.interface import (
    Architecture,
    Backbone,
    BackboneAdapter,
    BackboneShape,
    ExportResult,
    GatherContext,
    ImageStepper,
    refuse_rep_token,
    LMHeadWithLoss,
    PartitionContext,
    SequenceView,
    no_gather,
    no_partitioning,
)
from arra_ds.model.llamagen.checkpoint import CHECKPOINT_WEIGHT_KEYS, load_llamagen_checkpoint
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.model.llamagen.gpt import LlamaGenGPT
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from arra_ds.weights import check_state

# model.attn_implementation values LlamaGen's attention honours: it always calls PyTorch SDPA (flash on GPU).
LLAMAGEN_ATTENTION = ("auto", "sdpa")
# every Linear of a block (upstream names): fused q/k/v, the output projection, the SwiGLU projections
LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")  # released LlamaGen weights files (torch.save)
EXPORT_FILE = "c2i.pt"  # the export: upstream's layout, {"model": state dict}, as sample_c2i.py reads it

# The class token has no id in the code vocabulary; this marks its slot in the token view of a batch.
CLASS_TOKEN_SLOT = IGNORE_INDEX
# Codes have a fixed count per image, so class-to-image batches are never padded; any code id would do.
CODE_PAD_ID = 0


class LlamaGenAdapter(BackboneAdapter):
    """A ``LlamaGenGPT`` whose ``output`` head is an ``LMHeadWithLoss`` (same name ``output.weight``).

    A batch holds ``class_ids`` [B] and the image's codes as ``input_ids`` / ``labels`` [B, T]
    (T = block_size). The model runs on ``[class token, code_0 .. code_{T-2}]`` as upstream trains it,
    so its T outputs predict all T codes; in the text-to-image view ARRA uses, that sequence is

        input_ids  [CLASS_TOKEN_SLOT, code_0, ..., code_{T-1}]     labels  [IGNORE_INDEX, code_0, ..., code_{T-1}]

    and every position whose next target is an image code (``<HYBNEXT>``) is every one of the T
    positions, the class token's included. There is no image-start token (``align.target=rep``).
    """

    module: LlamaGenGPT

    @property
    def config(self) -> LlamaGenConfig:
        return self.module.config

    @property
    def hidden_size(self) -> int:
        return self.config.resolved_dim

    @property
    def num_layers(self) -> int:
        return self.config.resolved_n_layer

    @property
    def initializer_range(self) -> float:
        return self.config.initializer_range

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def image_token_ids(self) -> torch.Tensor:
        return torch.arange(self.config.vocab_size)  # the vocabulary is the VQ codebook

    @property
    def pad_id(self) -> int:
        return CODE_PAD_ID

    @property
    def lm_head(self) -> LMHeadWithLoss:
        return self.module.output

    @property
    def input_embedding(self) -> nn.Parameter:
        return self.module.tok_embeddings.weight

    def layer_output(self, layer: int) -> nn.Module:
        # As for the Hugging Face backbones: layer L is block L's output, the last one after the final norm.
        return self.module.norm if layer == self.num_layers else self.module.layers[layer - 1]

    def _check_batch(self, class_ids: torch.Tensor, codes: torch.Tensor) -> None:
        if codes.shape[1] != self.config.block_size:
            raise ValueError(
                f"class-to-image samples hold {codes.shape[1]} codes but model.llamagen.block_size="
                f"{self.config.block_size}; pre-tokenise at the image size the model is built for "
                "((image_size / 16) ** 2 codes) or change model.llamagen.block_size"
            )
        if bool(((class_ids < 0) | (class_ids >= self.config.num_classes)).any()):
            raise ValueError(
                f"class ids {sorted(set(class_ids.tolist()))} fall outside model.llamagen.num_classes="
                f"{self.config.num_classes}; set it to the data set's class count"
            )

    def code_grid(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        side = self.config.grid_size  # every sample holds one image's block_size codes, a square grid
        return side, side

    def run(self, batch: dict) -> SequenceView:
        class_ids, codes, labels = batch["class_ids"], batch["input_ids"], batch["labels"]  # [B], [B, T], [B, T]
        self._check_batch(class_ids, codes)
        hidden = self.module.forward_hidden(class_ids, codes[:, :-1])  # [B, T, dim]; position t predicts code t
        class_column = codes.new_full((codes.shape[0], 1), CLASS_TOKEN_SLOT)
        return SequenceView(
            input_ids=torch.cat([class_column, codes], dim=1),  # [B, 1 + T]
            labels=torch.cat([class_column.new_full(class_column.shape, IGNORE_INDEX), labels], dim=1),
            hidden=hidden,
        )


def build_llamagen_backbone(
    config: LlamaGenConfig,
    *,
    z_loss_weight: float = 0.0,
    lm_loss_chunk_size: int = 2048,
    fused_kernels: str = "auto",
    activation_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    gather: GatherContext = no_gather,
    partitioned: PartitionContext = no_partitioning,
) -> LlamaGenAdapter:
    """A randomly initialised LlamaGen GPT for ARRA training (model.source=llamagen).

    Built inside ``partitioned`` (ZeRO-3: each layer's parameters are partitioned as it is created)
    and initialised through ``gather``; the ``output`` head becomes an ``LMHeadWithLoss`` over the
    same parameter. ``activation_checkpointing`` (model.activation_checkpointing) or
    ``config.gradient_checkpointing`` recomputes every block in backward.
    """
    if activation_checkpointing and not config.gradient_checkpointing:
        config = replace(config, gradient_checkpointing=True)
    with partitioned():
        model = LlamaGenGPT(config, initialize=False)
    model.initialize_weights(gather)
    # Under zero.Init the parameters were created in the training dtype already; cast only otherwise.
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    model.output = LMHeadWithLoss(model.output.weight, z_loss_weight, lm_loss_chunk_size, fused_kernels)
    return LlamaGenAdapter(model)


# ------------------------------------------------------------------------------------------------
# Sampling hooks
# ------------------------------------------------------------------------------------------------


class LlamaGenStepper(ImageStepper):
    """Class labels -> the block_size codes of a grid x grid image, every step drawn from the whole codebook."""

    allowed = None  # the vocabulary is the codebook

    def __init__(self, model: LlamaGenGPT):
        self.model = model
        self.num_steps = model.config.block_size
        self.grid_size = model.config.grid_size
        self.device = next(model.parameters()).device

    def prefix_length(self, condition: int) -> int:
        return 1  # one class token: nothing to pad

    def start(self, conditions: Sequence[int], guided: bool, pad_to: int = 0) -> None:
        config = self.model.config
        if guided and not config.has_null_class:
            raise ConfigError(
                "classifier-free guidance (sampling.guidance_scale != 1) needs the null class, which a model trained "
                "with class_dropout_prob=0 lacks; use sampling.guidance_scale=1"
            )
        if not all(0 <= c < config.num_classes for c in conditions):
            raise ConfigError(f"class ids must lie in [0, {config.num_classes}), got {sorted(set(conditions))}")
        labels = torch.tensor(list(conditions), dtype=torch.long, device=self.device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.model.null_class_id)])
        self._logits, self._cache = self.model.prefill(labels)  # [R, V] fp32: logits for code 0
        self._position = 0

    def logits(self) -> torch.Tensor:
        return self._logits

    def feed(self, tokens: torch.Tensor, attend: torch.Tensor | None = None) -> None:
        self._logits, self._cache = self.model.decode_step(tokens.to(self.device), self._cache, position=self._position)
        self._position += 1

    def codes(self, drawn: torch.Tensor) -> torch.Tensor:
        return drawn.view(drawn.shape[0], self.grid_size, self.grid_size)


# ------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------


class LlamaGenBackbone(Backbone):
    """LlamaGen's c2i GPT from random initialisation, sized by ``model.llamagen.*`` (ARRA-Base, paper appendix 6)."""

    name = "llamagen"
    condition = "class"
    # the paper's ARRA-Base FID setting (CFG 2.0) with LlamaGen's FID sampling (sample_c2i_ddp.py: no top-k)
    sampling_defaults = {"guidance_scale": 2.0, "image_top_k": 0}

    def validate(self, cfg) -> None:
        cfg.llamagen.validate()
        if cfg.path:
            raise ConfigError(
                f"model.path={cfg.path} is not used by model.source=llamagen (trained from random initialisation, "
                "sized by model.llamagen.*); remove model.path"
            )
        if cfg.attn_implementation not in LLAMAGEN_ATTENTION:
            raise ConfigError(
                f"model.attn_implementation={cfg.attn_implementation}: LlamaGen's attention always runs PyTorch SDPA "
                f"(its flash backend on GPU); use one of {list(LLAMAGEN_ATTENTION)}"
            )

    def shape(self, cfg) -> BackboneShape:
        # a sample is the image's codes; the class token is added by the model
        return BackboneShape(cfg.llamagen.resolved_n_layer, cfg.llamagen.resolved_dim, cfg.llamagen.block_size)

    def architecture(self, cfg) -> Architecture:
        sizes = cfg.llamagen
        return Architecture(
            hidden=sizes.resolved_dim, layers=sizes.resolved_n_layer, heads=sizes.resolved_n_head,
            kv_heads=sizes.resolved_n_head, intermediate=sizes.ffn_dim, vocab=sizes.vocab_size, qk_norm=False,
            head="output", image_rows=torch.arange(sizes.vocab_size),  # the vocabulary is the codebook
            lora_targets=LORA_TARGETS,
        )

    def build(self, cfg, dtype, gather, partitioned) -> LlamaGenAdapter:
        return build_llamagen_backbone(
            cfg.llamagen, z_loss_weight=cfg.z_loss_weight, lm_loss_chunk_size=cfg.lm_loss_chunk_size,
            fused_kernels=cfg.fused_kernels, activation_checkpointing=cfg.activation_checkpointing, dtype=dtype,
            gather=gather, partitioned=partitioned,
        )

    def skeleton(self, cfg, dtype: torch.dtype) -> LlamaGenGPT:
        # parameters on the meta device; the RoPE table (a plain attribute) real
        with init_empty_weights(include_buffers=False):
            model = LlamaGenGPT(cfg.llamagen, initialize=False)
        return model.to(dtype)

    def claims(self, path: Path) -> dict | None:
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            return {"kind": "llamagen_checkpoint", "source": self.name}
        return None

    def load_pretrained(self, cfg, path: Path, dtype: torch.dtype) -> LlamaGenGPT:
        model = LlamaGenGPT(cfg.llamagen, initialize=False)
        load_llamagen_checkpoint(model, path)
        return model.to(dtype)

    def num_classes(self, cfg) -> int:
        return cfg.llamagen.num_classes

    def sampling_grid(self, cfg, height_px: int, width_px: int) -> tuple[int, int]:
        grid = cfg.llamagen.grid_size
        side = grid * self.code_patch_px
        if (height_px and height_px != side) or (width_px and width_px != side):
            raise ConfigError(
                f"sampling.height / width = {height_px} x {width_px}: this LlamaGen model draws {grid} x {grid} codes "
                f"({side} x {side} px, model.llamagen.block_size={cfg.llamagen.block_size}); leave them at 0"
            )
        return grid, grid

    def stepper(self, module, vocab, grid, rep_token: bool = False) -> LlamaGenStepper:
        refuse_rep_token(self.name, rep_token)
        return LlamaGenStepper(module)

    def load_decoder(self, config_file: str, checkpoint_file: str) -> LlamaGenVQ:
        if not checkpoint_file:
            raise ConfigError(
                "vqgan_checkpoint=<vq_ds16_c2i.pt> is required (LlamaGen's VQ tokenizer decodes the codes; its "
                "architecture from vqgan_config=<yaml of LlamaGenVQConfig fields>, default VQ-16): the model has no "
                "data record that names it"
            )
        vq_config = load_dataclass_config(LlamaGenVQConfig, config_file, ()) if config_file else LlamaGenVQConfig()
        return LlamaGenVQ.from_checkpoint(checkpoint_file, vq_config).eval()

    def export(self, cfg, state, base, out_dir: Path, dtype) -> ExportResult:
        """Upstream's checkpoint layout (``{"model": state dict}``, the names of ``autoregressive/models/gpt.py``):
        LlamaGen's own ``sample_c2i.py`` and ``launch/generate.py model=<out_dir>/c2i.pt backbone.llamagen.*`` load it."""
        check_state(self.skeleton(cfg, torch.float32).state_dict(), state, source="the trained weights",
                    what="the LlamaGen GPT of the run config", error=ConfigError)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
        torch.save({CHECKPOINT_WEIGHT_KEYS[0]: weights}, out_dir / EXPORT_FILE)
        sizes = {k: v for k, v in asdict(cfg.llamagen).items() if v is not None}
        summary = {
            "format": f"LlamaGen c2i checkpoint ({EXPORT_FILE}: weights under 'model', upstream names)",
            "parameters": int(sum(t.numel() for t in weights.values())),
            "llamagen": sizes,
        }
        return ExportResult(files=[EXPORT_FILE], summary=summary)


LLAMAGEN = LlamaGenBackbone()
