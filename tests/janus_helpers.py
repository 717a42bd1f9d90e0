"""A tiny random Janus-Pro in the transformers layout (what ``deepseek-community/Janus-Pro-1B`` holds, at toy size):
config.json, safetensors, generation_config.json and a word-level tokenizer.json with Janus's special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import JanusConfig, JanusForConditionalGeneration, JanusVQVAEConfig, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig

from arra_ds.tokens import janus as layout
from arra_ds.tokens.vocab import DEBUG_WORDS

GRID = 4  # codes per side: a 64 x 64 image (Janus-Pro: 24, 384 px)
IMAGE_SIZE = GRID * 16
NUM_CODES = 64
HIDDEN = 64
IMAGE_PLACEHOLDER = "<image_placeholder>"
SPECIALS = [layout.BOS, layout.EOS, layout.PAD, "<unk>", layout.IMAGE_START, layout.IMAGE_END, IMAGE_PLACEHOLDER,
            layout.USER_ROLE, layout.ASSISTANT_ROLE]


def tiny_tokenizer() -> Tokenizer:
    names = list(SPECIALS) + [":"] + [w for w in dict.fromkeys(DEBUG_WORDS) if w != ":"]
    tokenizer = Tokenizer(WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def tiny_config(tokenizer: Tokenizer, layers: int = 2, grid: int = GRID) -> JanusConfig:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    text = LlamaConfig(
        vocab_size=-(-len(vocab) // 64) * 64, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=vocab[layout.PAD],
        bos_token_id=vocab[layout.BOS], eos_token_id=vocab[layout.EOS], tie_word_embeddings=False,
    )
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=grid * 16,
                               patch_size=16, num_image_tokens=grid * grid, projection_dim=HIDDEN, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=NUM_CODES, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 1, 2, 2], num_res_blocks=1, projection_dim=HIDDEN,
                          image_token_embed_dim=HIDDEN)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=vocab[IMAGE_PLACEHOLDER])


def tiny_janus(seed: int = 0, layers: int = 2, grid: int = GRID) -> tuple[JanusForConditionalGeneration, Tokenizer]:
    """A random tiny Janus drawing ``grid`` x ``grid`` codes, whose every weight is non-trivial (the generation
    head's bias too) and whose codebook rows are unit vectors (Janus's VQ keeps them normalised; tokens/janus.py)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(tokenizer, layers, grid)).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.bias.normal_(0.0, 0.5)
        codebook = model.model.vqmodel.quantize.embedding.weight
        codebook.copy_(torch.nn.functional.normalize(torch.randn_like(codebook), dim=-1))
    return model, tokenizer


def save_tiny_janus(path: Path, seed: int = 0, layers: int = 2, grid: int = GRID) -> Path:
    """The transformers directory of a tiny Janus (what ``model.path`` / ``model=`` take)."""
    model, tokenizer = tiny_janus(seed, layers, grid)
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": vocab[layout.BOS], "eos_token_id": vocab[layout.EOS], "pad_token_id": vocab[layout.PAD],
        "guidance_scale": 5, "temperature": 1.0, "generation_kwargs": {"boi_token_id": vocab[layout.IMAGE_START]},
    }))
    return path
