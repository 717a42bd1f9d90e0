"""The debug backbone (``model.source=debug``): a tiny Chameleon whose config and tokenizer are built in code.

For CPU runs (the embedded default run, the built-in demo data set) and tests. It is the Chameleon family
(``model/chameleon.py``) in every respect but where its config, vocabulary and tokenizer come from: nothing is
read from disk, so its runs need no base checkpoint at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from arra_ds.errors import ConfigError
from arra_ds.model.chameleon import ChameleonFamily
from arra_ds.model.interface import BackboneShape
from arra_ds.tokens.vocab import BOS, EOS, PAD, ChameleonVocab, build_debug_tokenizer, build_debug_vocab
from arra_ds.tokens.vqgan import HF_VQ_PREFIX

# Rows of the vocabulary are rounded up to a multiple of this: friendlier matmul shapes.
VOCAB_ROUNDING = 64
DEBUG_VQ_SEED = 0  # the seed of the tiny vqmodel every exported debug model carries


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


def debug_chameleon_config(cfg: DebugModelConfig, attn_implementation: str) -> ChameleonConfig:
    tokenizer = build_debug_tokenizer(num_image_codes=cfg.num_image_codes)
    vocabulary_map = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = -(-len(vocabulary_map) // VOCAB_ROUNDING) * VOCAB_ROUNDING
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


class DebugBackbone(ChameleonFamily):
    """The tiny in-code Chameleon (``model.debug.*`` sizes); random initialisation, image rows kept."""

    name = "debug"

    def validate(self, cfg) -> None:
        cfg.debug.validate()

    def hf_config(self, cfg, attn_implementation: str = "sdpa") -> ChameleonConfig:
        hf_config = debug_chameleon_config(cfg.debug, attn_implementation)
        hf_config.attention_dropout = cfg.attention_dropout
        return hf_config

    def shape(self, cfg) -> BackboneShape:
        return BackboneShape(
            num_layers=cfg.debug.num_hidden_layers, hidden_size=cfg.debug.hidden_size,
            max_positions=cfg.debug.max_position_embeddings,
        )

    def from_pretrained(self, cfg, dtype: torch.dtype, attn: str) -> ChameleonForConditionalGeneration:
        hf_config = self.hf_config(cfg, attn)
        # Build without padding_idx: under zero.Init the embedding is already partitioned when HF's
        # init zeroes the padding row, which then fails. The pad row gets no gradient either way
        # (padded positions are masked out of attention and carry label -100).
        pad_id = hf_config.pad_token_id
        hf_config.pad_token_id = None
        model = ChameleonForConditionalGeneration._from_config(hf_config, dtype=dtype)
        model.config.pad_token_id = pad_id
        return model

    def vocab(self, cfg) -> ChameleonVocab:
        return build_debug_vocab(num_image_codes=cfg.debug.num_image_codes)

    def claims(self, path: Path) -> None:
        return None  # an exported debug model is a Chameleon directory like any other

    def text_tokenizer(self, cfg, override: str = ""):
        if override:
            return super().text_tokenizer(cfg, override)
        return build_debug_tokenizer(num_image_codes=cfg.debug.num_image_codes)

    def inference_files(self, cfg) -> list[Path]:
        return []  # built in code

    def for_inference(self, cfg, copied_dir: Path):
        return cfg

    def base_weights(self, cfg) -> dict[str, torch.Tensor]:
        """``model.vqmodel.*``: the tiny VQ of its config, initialised from a fixed seed. It exists only because
        every Chameleon has one; with it, stock ``from_pretrained`` finds every tensor it expects and initialises
        (and warns about) none."""
        hf_config = self.hf_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEBUG_VQ_SEED)
            vqmodel = ChameleonVQVAE(hf_config.vq_config)
        return {f"{HF_VQ_PREFIX}{name}": tensor.detach().contiguous() for name, tensor in vqmodel.state_dict().items()}

    def write_tokenizer(self, cfg, out_dir: Path) -> list[str]:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=build_debug_tokenizer(num_image_codes=cfg.debug.num_image_codes),
            bos_token=BOS, eos_token=EOS, pad_token=PAD,
        )
        tokenizer.save_pretrained(str(out_dir))
        return ["tokenizer.json"]

    def vq_weights_note(self, base: dict) -> str:
        return "the debug model's tiny vqmodel (seeded initial weights)"


DEBUG = DebugBackbone()
