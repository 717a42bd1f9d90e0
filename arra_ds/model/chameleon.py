"""The Hugging Face Chameleon family: Chameleon-7B (``model.source=chameleon``) and Lumina-mGPT-7B (``lumina_mgpt``).

Everything arra_ds knows about these backbones is here: building (under ZeRO-3 the trainer keeps a
``transformers`` ``HfDeepSpeedConfig`` alive while this runs, so ``from_pretrained`` / ``_from_config`` build
the model inside ``zero.Init`` and no rank holds the full weights; weight edits that need a whole tensor go
through the ``gather`` hook), Lumina-mGPT's residual dropout, the text vocabulary and tokenizer files, the
sampling hooks (the Lumina-mGPT sequence layout, below), the VQGAN decoder, and the export to a plain Hugging
Face directory. The debug preset (``model/debug.py``) is this family with its config built in code.

Sampling rows of one forward pass (R = B, or 2B with guidance):

    rows 0..B-1    conditional:   <pad>* <s> prompt <eot> <racm3:break> <grid h> <grid w>
    rows B..2B-1   unconditional: <pad>*                   <racm3:break> <grid h> <grid w>

The unconditional branch drops the prompt and starts at the image start, as Lumina-mGPT's
``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor`` does; here it runs in the same batch
as the conditional rows. Prompts are left-padded (attention mask, position ids counted from each row's first
real token). After the prefix, for each of h rows: w image codes (drawn, image tokens only), <reserved08799>
(forced); then <eoss> (forced), so a sample always decodes to an h x w code grid. Image-token logits are never
masked: the model runs as ``backbone.model`` + ``backbone.lm_head``, not through Hugging Face's
``ChameleonForConditionalGeneration.forward`` (which suppresses image tokens).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, DynamicCache

from arra_ds.errors import ConfigError
from arra_ds.model.interface import (
    Architecture,
    Backbone,
    BackboneAdapter,
    BackboneShape,
    ExportResult,
    GatherContext,
    ImageStepper,
    LMHeadWithLoss,
    SequenceView,
    no_gather,
)
from arra_ds.model.trainable import DEFAULT_LORA_TARGETS
from arra_ds.tokens.conversation import ConversationTokenizer, load_text_tokenizer
from arra_ds.tokens.layout import CODE_PATCH_PX, GRID_CELL_PX, ImageGrid, image_grid_of_sample, is_valid_pixel_size
from arra_ds.tokens.vocab import (
    BOS,
    END_OF_TURN,
    IMAGE_END,
    IMAGE_START,
    REP_TOKEN,
    ROW_END,
    ChameleonVocab,
    VocabError,
    tokens_to_image,
)
from arra_ds.tokens.vqgan import HF_VQ_PREFIX, VQGAN
from arra_ds.weights import read_safetensors_prefixed

HF_CONFIG_FILE = "config.json"
# What stock transformers reads besides config.json and the weights: copied into a run and into an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HF_MODEL_TYPE = "chameleon"  # config.json "model_type" of Chameleon and Lumina-mGPT checkpoints
LUMINA_MGPT_NAME = "lumina_mgpt"
DEFAULT_IMAGE_SIZE = 512  # ARRA's and Lumina-mGPT's sampling size, for models whose trained size is unknown


def resolve_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ------------------------------------------------------------------------------------------------
# Lumina-mGPT's residual dropout
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def vocab_of(config: ChameleonConfig, source: str) -> ChameleonVocab:
    vocab = ChameleonVocab.from_model_config(config)
    if vocab.vocab_size > config.vocab_size:
        raise VocabError(
            f"{source}: vocabulary_map has ids up to {vocab.vocab_size - 1} but the model's vocab_size is "
            f"{config.vocab_size}; the config.json does not belong to these weights"
        )
    return vocab


def as_arra_backbone(model: ChameleonForConditionalGeneration, cfg) -> ChameleonForConditionalGeneration:
    """Drop the VQ model (pre-tokenised data never needs it) and give the LM head its fused loss."""
    if hasattr(model.model, "vqmodel"):
        del model.model.vqmodel
    model.config.use_cache = False
    model.lm_head = LMHeadWithLoss(model.lm_head.weight, cfg.z_loss_weight, cfg.lm_loss_chunk_size, cfg.fused_kernels)
    return model


def skeleton_like(hf_config: ChameleonConfig, dtype: torch.dtype, cfg) -> ChameleonForConditionalGeneration:
    """A backbone of ``hf_config`` with its parameters on the meta device, shaped as ``load_backbone`` builds it (no vqmodel,
    ``LMHeadWithLoss`` head): the module a checkpoint's tensors are assigned or copied into."""
    # parameters on the meta device, buffers (rotary frequencies, not in any state dict) real
    with init_empty_weights(include_buffers=False):
        model = ChameleonForConditionalGeneration._from_config(hf_config, dtype=dtype)
    return as_arra_backbone(model, cfg)


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

    def code_grid(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        grid = image_grid_of_sample(input_ids.tolist(), self.vocab)  # from the grid tokens after <racm3:break>
        return grid.code_height, grid.code_width

    def run(self, batch: dict) -> SequenceView:
        input_ids = batch["input_ids"]  # [B, T]
        hidden = self.module.model(
            input_ids=input_ids, attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state  # [B, T, H]
        return SequenceView(input_ids=input_ids, labels=batch["labels"], hidden=hidden[:, :-1])


# ------------------------------------------------------------------------------------------------
# Sampling hooks
# ------------------------------------------------------------------------------------------------


class ChameleonStepper(ImageStepper):
    """The Lumina-mGPT layout on a ``ChameleonForConditionalGeneration`` (eval mode, on its device); see the
    module docstring. Conditions are prompt token ids without <s> / <eot>."""

    def __init__(self, backbone: nn.Module, vocab: ChameleonVocab, grid: ImageGrid, rep_token: bool = False):
        self.backbone = backbone
        self.vocab = vocab
        self.grid = grid
        # rep_token: the data's assistant turn opened with <REP> before the image (``conversation_tokens``); every
        # row, conditional or not, starts its image after it as in training
        self.image_prefix = ([vocab.id(REP_TOKEN)] if rep_token else []) + grid.prefix(vocab)
        self.num_steps = grid.body_length
        self.device = next(backbone.parameters()).device
        allowed = torch.zeros(backbone.lm_head.weight.shape[0], dtype=torch.bool)  # [V]: image code tokens
        allowed[vocab.image_token_ids] = True
        self.allowed = allowed.to(self.device)
        self.text_stop_ids = frozenset({vocab.end_of_turn_id, vocab.eos_id})
        self.pad_id = vocab.pad_id
        self._hidden: torch.Tensor | None = None

    def conditional_prefix(self, prompt_ids: Sequence[int]) -> list[int]:
        """<s> prompt <eot> [<REP>] <racm3:break> <grid h> <grid w> (the layout of ``conversation_tokens``)."""
        return [self.vocab.bos_id, *prompt_ids, self.vocab.end_of_turn_id, *self.image_prefix]

    def prefix_length(self, condition: Sequence[int]) -> int:
        return len(condition) + 2 + len(self.image_prefix)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        out = self.backbone.model(
            input_ids=input_ids, attention_mask=self._attention_mask, position_ids=position_ids,
            past_key_values=self._cache, use_cache=True,
        )
        self._hidden = out.last_hidden_state[:, -1]  # [R, H]: the last position's hidden state

    def start(self, conditions: Sequence[Sequence[int]], guided: bool, pad_to: int = 0) -> None:
        rows = [self.conditional_prefix(p) for p in conditions]
        if guided:
            rows += [self.image_prefix] * len(conditions)
        width = max(pad_to, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), self.vocab.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)  # [R, T]
        self._attention_mask = attention_mask.to(self.device)
        self._cache = DynamicCache()
        self._forward(input_ids.to(self.device), position_ids.to(self.device))
        self._next_position = position_ids[:, -1:].to(self.device) + 1  # [R, 1]

    def logits(self) -> torch.Tensor:
        return self.backbone.lm_head(self._hidden).float()  # [R, V]

    def feed(self, tokens: torch.Tensor, attend: torch.Tensor | None = None) -> None:
        rows = tokens.shape[0]
        step_mask = torch.ones((rows, 1), dtype=torch.long, device=self.device) if attend is None else (
            attend[:, None].long().to(self.device)
        )
        self._attention_mask = torch.cat([self._attention_mask, step_mask], dim=1)
        self._forward(tokens[:, None].to(self.device), self._next_position)
        self._next_position = self._next_position + 1

    def forced_token(self, step: int) -> int | None:
        return self.grid.forced_token(step, self.vocab)

    def codes(self, drawn: torch.Tensor) -> torch.Tensor:
        prefix = self.grid.prefix(self.vocab)
        return torch.stack([tokens_to_image(prefix + row.tolist(), self.vocab) for row in drawn])  # checks the layout


# ------------------------------------------------------------------------------------------------
# The backbones
# ------------------------------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict:
    return json.loads((Path(path) / HF_CONFIG_FILE).read_text())


def check_tokenizer(tokenizer, vocab: ChameleonVocab, where: str) -> None:
    """The prompt tokenizer's special-token ids must be the model's (a tokenizer of another model would
    silently write other tokens)."""
    names = (BOS, IMAGE_START, IMAGE_END, ROW_END, END_OF_TURN)
    wrong = [n for n in names if tokenizer.token_to_id(n) != vocab.id(n)]
    if wrong:
        raise VocabError(
            f"tokenizer ids disagree with the model's vocabulary_map for {wrong} ({where}); use the tokenizer "
            "that belongs to this model (tokenizer=<tokenizer.json>)"
        )


class ChameleonFamily(Backbone):
    """A Hugging Face Chameleon-architecture checkpoint on local disk (``model.path``)."""

    condition = "text"
    # ARRA's inference_vision.py: cfg 4.0, image top-k 2000 (temperature 1.0, text top-k 10 are SamplingConfig's own)
    sampling_defaults = {"guidance_scale": 4.0, "image_top_k": 2000}
    code_patch_px = CODE_PATCH_PX
    zero_image_head_by_default = False  # start the image rows of lm_head at zero with model.init_image_head=auto

    # ---- config ----------------------------------------------------------------------------------
    def validate(self, cfg) -> None:
        if not cfg.path:
            raise ConfigError(
                f"model.source={self.name} needs model.path=<local checkpoint dir> "
                "(a directory with config.json and the weights; nothing is downloaded)"
            )
        if not (Path(cfg.path) / HF_CONFIG_FILE).is_file():
            raise ConfigError(f"model.path={cfg.path}: no {HF_CONFIG_FILE} there; point it at the checkpoint directory")

    def hf_config(self, cfg, attn_implementation: str = "sdpa") -> ChameleonConfig:
        """The Hugging Face config of the backbone ``cfg`` describes."""
        hf_config = ChameleonConfig.from_pretrained(cfg.path, local_files_only=True)
        if hf_config.vocabulary_map is None:  # a config.json with the shape only (launch/plan.py): HF needs a mapping
            hf_config.vocabulary_map = {}
        hf_config._attn_implementation = attn_implementation
        hf_config.attention_dropout = cfg.attention_dropout
        return hf_config

    def shape(self, cfg) -> BackboneShape:
        config = read_hf_config(cfg.path)
        return BackboneShape(
            num_layers=int(config["num_hidden_layers"]), hidden_size=int(config["hidden_size"]),
            max_positions=int(config.get("max_position_embeddings", 0)),
        )

    def architecture(self, cfg) -> Architecture:
        hf = self.hf_config(cfg)
        if hf.vocabulary_map:
            rows = ChameleonVocab.from_model_config(hf).image_token_ids
        else:  # a config.json with the shape only: the row ids do not matter for memory, their count does
            rows = torch.arange(hf.vq_config.num_embeddings)
        return Architecture(
            hidden=hf.hidden_size, layers=hf.num_hidden_layers, heads=hf.num_attention_heads,
            kv_heads=hf.num_key_value_heads or hf.num_attention_heads, intermediate=hf.intermediate_size,
            vocab=hf.vocab_size, qk_norm=True, head="lm_head", image_rows=rows, lora_targets=tuple(DEFAULT_LORA_TARGETS),
        )

    def zero_image_head(self, cfg) -> bool:
        if cfg.init_image_head == "auto":
            return self.zero_image_head_by_default
        return cfg.init_image_head == "zero"

    # ---- training --------------------------------------------------------------------------------
    def from_pretrained(self, cfg, dtype: torch.dtype, attn: str) -> ChameleonForConditionalGeneration:
        return ChameleonForConditionalGeneration.from_pretrained(
            cfg.path, dtype=dtype, attn_implementation=attn, attention_dropout=cfg.attention_dropout,
            local_files_only=True, use_safetensors=None,
        )

    def load_backbone(
        self, cfg, dtype: torch.dtype = torch.float32, gather: GatherContext = no_gather
    ) -> tuple[ChameleonForConditionalGeneration, ChameleonVocab]:
        """Build (from the config: random init) or load (``from_pretrained``) the backbone; returns (model, vocab).

        The model has no ``vqmodel`` and its ``lm_head`` is an ``LMHeadWithLoss``. Image-token logits are never
        masked (we do not call HF's forward). With ``cfg.residual_dropout`` > 0 its decoder layers carry
        ``ResidualDropout`` hooks, active in training mode only.
        """
        model = as_arra_backbone(self.from_pretrained(cfg, dtype, resolve_attn_implementation(cfg.attn_implementation)), cfg)
        vocab = vocab_of(model.config, cfg.path or self.name)
        if self.zero_image_head(cfg):
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

    def build(self, cfg, dtype, gather, partitioned) -> BackboneAdapter:
        return ChameleonAdapter(*self.load_backbone(cfg, dtype=dtype, gather=gather))

    def vocab(self, cfg) -> ChameleonVocab:
        vocabulary_map = read_hf_config(cfg.path).get("vocabulary_map")
        if not vocabulary_map:
            raise ConfigError(f"{Path(cfg.path) / HF_CONFIG_FILE} has no vocabulary_map; is it a Chameleon checkpoint?")
        return ChameleonVocab.from_vocabulary_map(vocabulary_map, source=str(Path(cfg.path) / HF_CONFIG_FILE))

    # ---- inference -------------------------------------------------------------------------------
    def skeleton(self, cfg, dtype: torch.dtype) -> ChameleonForConditionalGeneration:
        return skeleton_like(self.hf_config(cfg, resolve_attn_implementation(cfg.attn_implementation)), dtype, cfg)

    def claims(self, path: Path) -> dict | None:
        """A Hugging Face Chameleon directory ({"kind": "hf", ...}); see ``Backbone.claims``."""
        # Any Chameleon-architecture directory (Lumina-mGPT, an export of a trained run) samples as
        # Lumina-mGPT does: its image rows are kept as they are.
        if (path / HF_CONFIG_FILE).is_file() and read_hf_config(path).get("model_type") == HF_MODEL_TYPE:
            return {"kind": "hf", "source": LUMINA_MGPT_NAME, "path": str(path), "init_image_head": "keep"}
        return None

    def load_pretrained(self, cfg, path: Path, dtype: torch.dtype) -> nn.Module:
        return self.load_backbone(replace(cfg, path=str(path)), dtype=dtype)[0]

    def text_tokenizer(self, cfg, override: str = ""):
        path = Path(override) if override else Path(cfg.path) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"prompt tokenizer {path} not found; pass the Chameleon text tokenizer (tokenizer.json / "
                "text_tokenizer.json) with tokenizer=<file>"
            )
        tokenizer = load_text_tokenizer(path)
        check_tokenizer(tokenizer, self.vocab(cfg), str(path))
        return tokenizer

    def encode_prompt(self, tokenizer, vocab: ChameleonVocab, text: str) -> list[int]:
        # tokenised exactly as pre-tokenization tokenises a human turn; <s> / <eot> are the stepper's frame
        return ConversationTokenizer(tokenizer, vocab).tokenize([("human", text)]).tokens[1:-1]

    def sampling_grid(self, cfg, height_px: int, width_px: int) -> tuple[int, int]:
        height_px, width_px = height_px or DEFAULT_IMAGE_SIZE, width_px or DEFAULT_IMAGE_SIZE
        for key, value in (("height", height_px), ("width", width_px)):
            if not is_valid_pixel_size(value):
                raise ConfigError(
                    f"sampling.{key}={value} must be a positive multiple of {GRID_CELL_PX} "
                    f"(one grid token = {GRID_CELL_PX} px), e.g. 512, or 0 (the size the model was trained at)"
                )
        grid = ImageGrid.for_pixels(height_px, width_px)
        return grid.code_height, grid.code_width

    def stepper(self, module, vocab, grid, rep_token: bool = False) -> ChameleonStepper:
        return ChameleonStepper(module, vocab, ImageGrid(*grid), rep_token)

    def load_decoder(self, config_file: str, checkpoint_file: str) -> VQGAN:
        if not config_file or not checkpoint_file:
            raise ConfigError(
                "vqgan_config=<vqgan.yaml> and vqgan_checkpoint=<vqgan.ckpt> are required (the decoder of the image "
                "codes): the model has no data record that names the VQGAN its data was tokenised with"
            )
        return VQGAN.from_original(config_file, checkpoint_file).eval()

    # ---- self-contained runs ---------------------------------------------------------------------
    def inference_files(self, cfg) -> list[Path]:
        base = Path(cfg.path)
        return [base / name for name in (HF_CONFIG_FILE, *TOKENIZER_FILES) if (base / name).is_file()]

    def for_inference(self, cfg, copied_dir: Path):
        return replace(cfg, path=str(copied_dir))

    def base_weights(self, cfg) -> dict[str, torch.Tensor]:
        """``model.vqmodel.*`` tensors of the base checkpoint's safetensors files (empty if it has none)."""
        return read_safetensors_prefixed(cfg.path, HF_VQ_PREFIX)

    # ---- export ----------------------------------------------------------------------------------
    def write_tokenizer(self, cfg, out_dir: Path) -> list[str]:
        copied = []
        for path in self.inference_files(cfg):
            if path.name in TOKENIZER_FILES:
                shutil.copy2(path, out_dir / path.name)
                copied.append(path.name)
        return copied

    def export(self, cfg, state, base, out_dir: Path, dtype) -> ExportResult:
        """A plain ``ChameleonForConditionalGeneration`` directory (config.json with the vocabulary_map, safetensors
        shards, tokenizer files): ARRAModel keeps the backbone's Hugging Face names, so nothing is renamed. The VQ
        image tokenizer (``model.vqmodel.*``) is not trained: ``base`` carries it when the base checkpoint has it."""
        hf_config = self.hf_config(cfg)
        weights = dict(state)
        weights.update({k: (v.to(dtype) if dtype is not None else v) for k, v in base.items()})
        with torch.device("meta"):
            skeleton = ChameleonForConditionalGeneration(hf_config)
        expected = set(skeleton.state_dict())
        missing = sorted(k for k in expected - set(weights) if not k.startswith(HF_VQ_PREFIX))
        unexpected = sorted(set(weights) - expected)
        if missing or unexpected:
            raise ConfigError(
                f"the trained weights do not match the Chameleon architecture of the run config: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        if dtype is not None:
            hf_config.dtype = dtype  # transformers >= 4.56 (torch_dtype warns)
        out_dir.mkdir(parents=True, exist_ok=True)
        skeleton.config = hf_config
        skeleton.save_pretrained(str(out_dir), state_dict=weights, safe_serialization=True, max_shard_size="5GB")
        tokenizer = self.write_tokenizer(cfg, out_dir)
        summary = {
            "format": "Hugging Face ChameleonForConditionalGeneration (transformers from_pretrained)",
            "parameters": int(sum(t.numel() for t in weights.values())),
            "vq_weights": self.vq_weights_note(base),
            "tokenizer": tokenizer,
        }
        return ExportResult(files=sorted(p.name for p in out_dir.iterdir()), summary=summary)

    def vq_weights_note(self, base: dict) -> str:
        return "copied from the base checkpoint" if base else "not included (from_pretrained initialises them)"


class ChameleonBackbone(ChameleonFamily):
    """Chameleon-7B (``facebook/chameleon-7b`` layout): released without image generation, so the image rows of
    ``lm_head`` start at zero (``model.init_image_head=auto``), as Lumina-mGPT trains from it (ARRA, paper 4.1)."""

    name = "chameleon"
    zero_image_head_by_default = True


class LuminaMGPTBackbone(ChameleonFamily):
    """Lumina-mGPT-7B (a Chameleon fine-tune that draws images; the extra keys of its config.json are ignored and
    its image rows are kept): ARRA-Adapt."""

    name = LUMINA_MGPT_NAME


CHAMELEON = ChameleonBackbone()
LUMINA_MGPT = LuminaMGPTBackbone()
