"""Janus-Pro (``model.source=janus``): transformers' ``JanusForConditionalGeneration`` drawing images from text.

Janus-Pro (deepseek-ai/Janus-Pro-1B / -7B, in the transformers layout of ``deepseek-community/Janus-Pro-1B``) is a
Llama language model with two visual paths: SigLIP + aligner for understanding, and for generation a VQ image
tokenizer (LlamaGen's VQ-16), generation embeddings + aligner (codes -> language-model inputs) and a generation
head (language-model outputs -> code logits: Linear - GELU - Linear). arra_ds trains the generation path:

    input   BOS <|User|>: prompt\\n\\n<|Assistant|>: <begin_of_image> | code_0 ... code_575
            text embeddings                                          | generation_aligner(generation_embeddings)
    output  the generation head's logits at every position that predicts a code (<begin_of_image> .. code_574)

The loss is next-token cross-entropy on the codes with z-loss (``LMHeadWithLoss`` over the head's last linear
layer ``vision_head``, bias included; the layers before it run in ``JanusAdapter.run``), and ARRA aligns the output
of language-model layer L at the same positions. The understanding path (``vision_model``, ``aligner``), the VQ
tokenizer (``vqmodel``, frozen: data is pre-tokenised) and the text head (``lm_head``) take no part in drawing:
they are not built for training, and an export takes them back from the base checkpoint (``base_weights``).

Classifier-free guidance as Janus samples and trains it: the unconditional prompt keeps BOS and
``<begin_of_image>`` and has pad tokens, attended, in place of the prompt (``tokens/janus.py``); in training a
fraction ``model.janus.prompt_dropout`` of the samples get it instead of their prompt.

Under ZeRO-3 the trainer keeps transformers' ``HfDeepSpeedConfig`` alive while ``build`` runs, so
``from_pretrained`` builds inside ``zero.Init`` (no rank holds the full model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from accelerate import init_empty_weights
from tokenizers import Tokenizer
from torch import nn
from transformers import DynamicCache, JanusConfig, JanusForConditionalGeneration

from arra_ds.config import load_dataclass_config
from arra_ds.errors import ConfigError
from arra_ds.model.chameleon import resolve_attn_implementation
from arra_ds.model.interface import (
    Architecture,
    Backbone,
    BackboneAdapter,
    BackboneShape,
    ExportResult,
    ImageStepper,
    refuse_rep_token,
    LMHeadWithLoss,
    SequenceView,
)
from arra_ds.model.trainable import DEFAULT_LORA_TARGETS
from arra_ds.tokens import janus as layout
from arra_ds.tokens.janus import JanusVocab
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from arra_ds.tokens.vocab import VocabError
from arra_ds.weights import read_safetensors_prefixed

NAME = "janus"
HF_CONFIG_FILE = "config.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
# What stock transformers reads besides config.json and the weights (tokenizer, processor, chat template): copied
# into a run and into an export.
PROCESSOR_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja",
)
# Parts of the checkpoint that drawing does not use: left out of training, carried by an export from the base.
UNTRAINED_PREFIXES = ("model.vision_model.", "model.aligner.", "model.vqmodel.", "lm_head.")
UNTRAINED_MODULES = ("vision_model", "aligner", "vqmodel")  # under JanusForConditionalGeneration.model
# Janus's sampling (generation_inference.py, transformers' generate): cfg 5, temperature 1, no top-k
SAMPLING_DEFAULTS = {"guidance_scale": 5.0, "image_top_k": 0}


@dataclass
class JanusModelConfig:
    """Settings of ``model.source=janus`` (its checkpoint is ``model.path``)."""

    # Drawn per sample and step: what classifier-free guidance samples against (10%: LlamaGen's text-to-image rate;
    # Janus's training code is not released).
    prompt_dropout: float = 0.1  # fraction of training prompts replaced by Janus's unconditional prompt (pad tokens)

    def validate(self) -> None:
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"model.janus.prompt_dropout={self.prompt_dropout} must be in [0, 1)")


def read_janus_config(path: str | Path) -> JanusConfig:
    return JanusConfig.from_pretrained(str(path), local_files_only=True)


def code_grid_side(config: JanusConfig) -> int:
    """Codes per side Janus draws (transformers: ``vq_config.num_patches`` = vision image_size // patch_size; 24)."""
    return int(config.vq_config.num_patches)


def as_arra_backbone(model: JanusForConditionalGeneration, cfg) -> JanusForConditionalGeneration:
    """Drop what drawing does not use and give the generation head's last linear layer its fused loss."""
    for name in UNTRAINED_MODULES:
        delattr(model.model, name)
    del model.lm_head
    model.config.use_cache = False
    head = model.model.generation_head
    head.vision_head = LMHeadWithLoss(
        head.vision_head.weight, cfg.z_loss_weight, cfg.lm_loss_chunk_size, cfg.fused_kernels, bias=head.vision_head.bias
    )
    return model


class JanusAdapter(BackboneAdapter):
    """A ``JanusForConditionalGeneration`` as ``as_arra_backbone`` leaves it.

    A batch is the loader's: ``input_ids`` [B, T] = framed prompt ids then the image's codes (raw code ids),
    ``labels`` [B, T] = IGNORE_INDEX over the prompt and padding, the codes after it. Positions whose label is a
    code take the generation embedding of their code, the others the text embedding of their token.
    """

    module: JanusForConditionalGeneration
    vocab: JanusVocab

    def __init__(self, module: JanusForConditionalGeneration, vocab: JanusVocab, prompt_dropout: float):
        super().__init__(module, vocab)
        self.prompt_dropout = prompt_dropout

    @property
    def text_config(self):
        return self.module.config.text_config

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def initializer_range(self) -> float:
        return float(self.text_config.initializer_range)

    @property
    def vocab_size(self) -> int:
        return self.module.config.vq_config.num_embeddings  # the generation head's rows: the codebook

    @property
    def image_token_ids(self) -> torch.Tensor:
        return torch.arange(self.vocab_size)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def lm_head(self) -> LMHeadWithLoss:
        return self.module.model.generation_head.vision_head

    @property
    def input_embedding(self) -> nn.Parameter:
        return self.module.model.language_model.embed_tokens.weight

    def layer_output(self, layer: int) -> nn.Module:
        language_model = self.module.model.language_model
        return language_model.norm if layer == self.num_layers else language_model.layers[layer - 1]

    def drop_prompts(self, input_ids: torch.Tensor, is_code: torch.Tensor) -> torch.Tensor:
        """``input_ids`` with the prompt of a random ``prompt_dropout`` of the rows replaced by pad tokens (the
        unconditional prompt: BOS and <begin_of_image> stay). Draws from the global RNG (seeded per rank)."""
        batch, length = input_ids.shape
        dropped = torch.rand(batch, device=input_ids.device) < self.prompt_dropout  # [B]
        prompt_len = is_code.int().argmax(dim=1)  # [B]: the first code's position
        position = torch.arange(length, device=input_ids.device)[None, :]  # [1, T]
        inside = (position >= 1) & (position < (prompt_len - 1)[:, None])  # [B, T]: between BOS and <begin_of_image>
        return input_ids.masked_fill(inside & dropped[:, None], self.vocab.pad_id)

    def code_grid(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        side = code_grid_side(self.module.config)  # every sample holds one square image of the model's size
        return side, side

    def run(self, batch: dict) -> SequenceView:
        input_ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
        model = self.module.model
        is_code = labels != IGNORE_INDEX  # [B, T]: every supervised token is an image code
        codes = input_ids[is_code]  # [N]
        if codes.numel() and int(codes.max()) >= self.vocab_size:
            raise ValueError(
                f"a sample's supervised tokens reach id {int(codes.max())}, beyond Janus's {self.vocab_size} image codes: "
                "the data was pre-tokenised for another model; write it with launch/pretokenize_janus.py"
            )
        text_ids = input_ids.masked_fill(is_code, self.vocab.pad_id)
        if self.prompt_dropout > 0 and self.module.training:
            text_ids = self.drop_prompts(text_ids, is_code)
        embeds = model.language_model.embed_tokens(text_ids)  # [B, T, H]
        # generation embeddings of the code positions only: [N, embed_dim] -> aligner -> [N, H]
        code_embeds = model.generation_aligner(model.generation_embeddings(codes))
        embeds = embeds.masked_scatter(is_code[..., None], code_embeds.to(embeds.dtype))
        hidden = model.language_model(
            inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state  # [B, T, H]
        head = model.generation_head
        projected = head.activation_fn(head.proj_out(hidden[:, :-1]))  # [B, T - 1, P]: vision_head's input
        return SequenceView(input_ids=input_ids, labels=labels, hidden=projected)


# ------------------------------------------------------------------------------------------------
# Sampling hooks
# ------------------------------------------------------------------------------------------------


class JanusStepper(ImageStepper):
    """Janus's sampling loop (``generation_inference.py``) on a backbone as ``as_arra_backbone`` leaves it, batched
    over prompts. Rows of one forward pass (R = B, or 2B with guidance), left-padded (masked) to one width:

        rows 0..B-1    conditional:    <pad>* BOS prompt        <begin_of_image>
        rows B..2B-1   unconditional:  <pad>* BOS <pad>*len     <begin_of_image>   (pads attended, as Janus)

    then h * w codes, each fed back through the generation embeddings and aligner; the generation head gives the
    logits. Conditions are prompt ids without BOS / <begin_of_image>."""

    allowed = None  # the head's rows are the codebook

    def __init__(self, module: JanusForConditionalGeneration, vocab: JanusVocab, grid: tuple[int, int]):
        self.module = module
        self.vocab = vocab
        self.grid = grid
        self.num_steps = grid[0] * grid[1]
        self.device = next(module.parameters()).device
        self.pad_id = vocab.pad_id
        self._hidden: torch.Tensor | None = None

    def prefix_length(self, condition: Sequence[int]) -> int:
        return len(condition) + 2

    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> None:
        out = self.module.model.language_model(
            inputs_embeds=embeds, attention_mask=self._attention_mask, position_ids=position_ids,
            past_key_values=self._cache, use_cache=True,
        )
        self._hidden = out.last_hidden_state[:, -1]  # [R, H]

    def start(self, conditions: Sequence[Sequence[int]], guided: bool, pad_to: int = 0) -> None:
        rows = [self.vocab.framed(ids) for ids in conditions]
        if guided:
            rows += [self.vocab.framed(self.vocab.unconditional_prompt(ids)) for ids in conditions]
        width = max(pad_to, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)  # [R, T]
        self._attention_mask = attention_mask.to(self.device)
        self._cache = DynamicCache()
        embeds = self.module.model.language_model.embed_tokens(input_ids.to(self.device))
        self._forward(embeds, position_ids.to(self.device))
        self._next_position = position_ids[:, -1:].to(self.device) + 1  # [R, 1]

    def logits(self) -> torch.Tensor:
        return self.module.model.generation_head(self._hidden).float()  # [R, K]

    def feed(self, tokens: torch.Tensor, attend: torch.Tensor | None = None) -> None:
        model = self.module.model
        embeds = model.generation_aligner(model.generation_embeddings(tokens[:, None].to(self.device)))  # [R, 1, H]
        step_mask = torch.ones((tokens.shape[0], 1), dtype=torch.long, device=self.device)
        self._attention_mask = torch.cat([self._attention_mask, step_mask], dim=1)
        self._forward(embeds, self._next_position)
        self._next_position = self._next_position + 1

    def codes(self, drawn: torch.Tensor) -> torch.Tensor:
        return drawn.view(drawn.shape[0], *self.grid)


# ------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------


def is_janus_dir(path: Path) -> bool:
    config = path / HF_CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("model_type") == NAME


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ConfigError(f"prompt tokenizer {path} not found; pass Janus-Pro's tokenizer.json with tokenizer=<file>")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file that is not its JSON
        raise ConfigError(f"{path} is not a `tokenizers` JSON file: {e}") from e


class JanusBackbone(Backbone):
    """Janus-Pro in the transformers layout on local disk (``model.path``)."""

    name = NAME
    condition = "text"
    sampling_defaults = SAMPLING_DEFAULTS

    # ---- config ----------------------------------------------------------------------------------
    def validate(self, cfg) -> None:
        cfg.janus.validate()
        if not cfg.path or not is_janus_dir(Path(cfg.path)):
            raise ConfigError(
                f"model.source=janus needs model.path=<a Janus-Pro directory in the transformers layout> (config.json "
                f"with model_type janus, safetensors, tokenizer.json; e.g. deepseek-community/Janus-Pro-1B), got "
                f"{cfg.path!r}"
            )
        if cfg.residual_dropout:
            raise ConfigError(
                f"model.residual_dropout={cfg.residual_dropout} is Lumina-mGPT's dropout; Janus has none: set it to 0"
            )
        if cfg.init_image_head == "zero":
            raise ConfigError("model.init_image_head=zero: Janus-Pro's generation head is trained; use keep (or auto)")

    def shape(self, cfg) -> BackboneShape:
        text = read_janus_config(cfg.path).text_config
        return BackboneShape(text.num_hidden_layers, text.hidden_size, int(text.max_position_embeddings))

    def architecture(self, cfg) -> Architecture:
        config = read_janus_config(cfg.path)
        text = config.text_config
        codes = int(config.vq_config.num_embeddings)  # the generation head's rows: one per VQ code
        return Architecture(
            hidden=text.hidden_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads or text.num_attention_heads, intermediate=text.intermediate_size,
            vocab=codes, qk_norm=False, head="model.generation_head.vision_head", image_rows=torch.arange(codes),
            lora_targets=tuple(DEFAULT_LORA_TARGETS),  # the Llama language model's projections
        )

    def hf_config(self, cfg) -> JanusConfig:
        config = read_janus_config(cfg.path)
        config.text_config.attention_dropout = cfg.attention_dropout
        return config

    # ---- training --------------------------------------------------------------------------------
    def load_backbone(self, cfg, dtype: torch.dtype, path: str = "") -> JanusForConditionalGeneration:
        """``from_pretrained`` (inside ``zero.Init`` under ZeRO-3), trimmed to the drawing path."""
        config = self.hf_config(replace(cfg, path=path or cfg.path))
        model = JanusForConditionalGeneration.from_pretrained(
            path or cfg.path, config=config, dtype=dtype,
            attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
            local_files_only=True, use_safetensors=None,
        )
        return as_arra_backbone(model, cfg)

    def build(self, cfg, dtype, gather, partitioned) -> JanusAdapter:
        model = self.load_backbone(cfg, dtype)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return JanusAdapter(model, self.vocab(cfg), cfg.janus.prompt_dropout)

    def vocab(self, cfg) -> JanusVocab:
        return JanusVocab.from_tokenizer_file(Path(cfg.path) / TOKENIZER_FILE)

    # ---- inference -------------------------------------------------------------------------------
    def skeleton(self, cfg, dtype: torch.dtype) -> JanusForConditionalGeneration:
        attn = resolve_attn_implementation(cfg.attn_implementation)
        with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers real
            model = JanusForConditionalGeneration._from_config(self.hf_config(cfg), dtype=dtype, attn_implementation=attn)
        return as_arra_backbone(model, cfg)

    def claims(self, path: Path) -> dict | None:
        """A Janus directory in the transformers layout (Janus-Pro, or an export of a trained run)."""
        if path.is_dir() and is_janus_dir(path):
            return {"kind": "hf", "source": self.name, "path": str(path)}
        return None

    def load_pretrained(self, cfg, path: Path, dtype: torch.dtype) -> nn.Module:
        return self.load_backbone(cfg, dtype, str(path))

    def text_tokenizer(self, cfg, override: str = ""):
        path = Path(override) if override else Path(cfg.path) / TOKENIZER_FILE
        tokenizer = load_tokenizer(path)
        vocab = self.vocab(cfg)
        wrong = [n for n in layout.SPECIAL_TOKENS if tokenizer.token_to_id(n) != vocab.id(n)]
        if wrong:
            raise VocabError(f"{path}: ids of {wrong} differ from the model's tokenizer.json; use the model's tokenizer")
        return tokenizer

    def encode_prompt(self, tokenizer, vocab: JanusVocab, text: str) -> list[int]:
        return layout.encode_prompt(tokenizer, vocab, text)

    def sampling_grid(self, cfg, height_px: int, width_px: int) -> tuple[int, int]:
        side = code_grid_side(read_janus_config(cfg.path)) * self.code_patch_px
        height_px, width_px = height_px or side, width_px or side
        for key, value in (("height", height_px), ("width", width_px)):
            if value < self.code_patch_px or value % self.code_patch_px:
                raise ConfigError(
                    f"sampling.{key}={value} must be a positive multiple of {self.code_patch_px} (one code per "
                    f"{self.code_patch_px} px), e.g. {side} (Janus-Pro's size), or 0"
                )
        return height_px // self.code_patch_px, width_px // self.code_patch_px

    def stepper(self, module, vocab, grid, rep_token: bool = False) -> JanusStepper:
        refuse_rep_token(self.name, rep_token)
        return JanusStepper(module, vocab, grid)

    def load_decoder(self, config_file: str, checkpoint_file: str) -> LlamaGenVQ:
        if not config_file or not checkpoint_file:
            raise ConfigError(
                "vqgan_config=<janus_vq.yaml> vqgan_checkpoint=<janus_vq.pt> are required (Janus's VQ tokenizer, which "
                "launch/pretokenize_janus.py writes next to the data): the model has no data record that names it"
            )
        return LlamaGenVQ.from_checkpoint(checkpoint_file, load_dataclass_config(LlamaGenVQConfig, config_file, ())).eval()

    # ---- self-contained runs ---------------------------------------------------------------------
    def inference_files(self, cfg) -> list[Path]:
        base = Path(cfg.path)
        names = (HF_CONFIG_FILE, HF_GENERATION_CONFIG_FILE, *PROCESSOR_FILES)
        return [base / name for name in names if (base / name).is_file()]

    def for_inference(self, cfg, copied_dir: Path):
        return replace(cfg, path=str(copied_dir))

    def base_weights(self, cfg) -> dict[str, torch.Tensor]:
        """The tensors of the parts training leaves out (understanding path, VQ tokenizer, text head)."""
        return read_safetensors_prefixed(cfg.path, UNTRAINED_PREFIXES)

    # ---- export ----------------------------------------------------------------------------------
    def export(self, cfg, state, base, out_dir: Path, dtype) -> ExportResult:
        """A ``JanusForConditionalGeneration`` directory: the trained drawing path (``state``, transformers names
        already) with the base checkpoint's other parts (``base``), its generation config (CFG 5, the
        ``boi_token_id`` transformers' image generation reads) and its tokenizer and processor files."""
        config = self.hf_config(cfg)
        weights = dict(state)
        weights.update({k: (v.to(dtype) if dtype is not None else v) for k, v in base.items()})
        with torch.device("meta"):
            skeleton = JanusForConditionalGeneration(config)
        expected = set(skeleton.state_dict())
        tied = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
        missing, unexpected = sorted(expected - set(weights) - tied), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ConfigError(
                f"the trained weights and the base checkpoint's do not make the Janus model of {cfg.path}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]} (the base checkpoint "
                "holds the vision, VQ and text-head tensors an export carries: keep it, or pass --base_model)"
            )
        if dtype is not None:
            config.dtype = dtype  # transformers >= 4.56 (torch_dtype warns)
        out_dir.mkdir(parents=True, exist_ok=True)
        skeleton.config = config
        skeleton.save_pretrained(str(out_dir), state_dict=weights, safe_serialization=True, max_shard_size="5GB")
        (out_dir / HF_GENERATION_CONFIG_FILE).write_text(json.dumps(self.generation_config(cfg), indent=2) + "\n")
        copied = []
        for path in self.inference_files(cfg):
            if path.name in PROCESSOR_FILES:
                shutil.copy2(path, out_dir / path.name)
                copied.append(path.name)
        summary = {
            "format": "Hugging Face JanusForConditionalGeneration (transformers from_pretrained; "
                      "generate(..., generation_mode='image'))",
            "parameters": int(sum(t.numel() for t in weights.values())),
            "base_parts": sorted({name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
                                  for name in base}),
            "tokenizer": copied,
        }
        return ExportResult(files=sorted(p.name for p in out_dir.iterdir()), summary=summary)

    def generation_config(self, cfg) -> dict:
        """The base's generation_config.json with what transformers' image generation reads filled in: the ids of
        BOS, pad and <begin_of_image> (``generation_kwargs.boi_token_id``) and Janus's CFG 5."""
        path = Path(cfg.path) / HF_GENERATION_CONFIG_FILE
        generation = json.loads(path.read_text()) if path.is_file() else {}
        vocab = self.vocab(cfg)
        generation.setdefault("bos_token_id", vocab.bos_id)
        generation.setdefault("eos_token_id", vocab.id(layout.EOS))
        generation.setdefault("pad_token_id", vocab.pad_id)
        generation.setdefault("guidance_scale", SAMPLING_DEFAULTS["guidance_scale"])
        generation["boi_token_id"] = vocab.image_start_id
        generation["generation_kwargs"] = {**generation.get("generation_kwargs", {}), "boi_token_id": vocab.image_start_id}
        return generation


JANUS = JanusBackbone()
