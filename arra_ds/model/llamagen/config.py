"""LlamaGen c2i GPT architecture and regularisation (``model.llamagen.*``): upstream ``ModelArgs`` + train_c2i.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

from arra_ds.errors import ConfigError

CONFIG_KEY_PREFIX = "model.llamagen"

# Upstream's class-conditional sizes (gpt.py GPT_B ... GPT_XXXL): name -> (n_layer, n_head, dim).
LLAMAGEN_SIZES: dict[str, tuple[int, int, int]] = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
}

# SwiGLU width as in LLaMA: 2/3 of a 4x MLP (same parameter count), rounded up to `multiple_of`.
FFN_EXPANSION = 4
SWIGLU_SHRINK_NUMERATOR, SWIGLU_SHRINK_DENOMINATOR = 2, 3
# 2D RoPE splits each head in two halves (rows, columns), each rotated in (even, odd) pairs: head_dim % 4 == 0.
ROPE_HEAD_DIM_DIVISOR = 4
# Upstream's c2i models condition on exactly one class token (more only made sense for t2i captions).
SUPPORTED_CLS_TOKEN_NUM = 1


@dataclass
class LlamaGenConfig:
    """Architecture and regularisation of the c2i GPT. Defaults: upstream ``ModelArgs`` + train_c2i.py."""

    size: str = "B"  # a key of LLAMAGEN_SIZES; n_layer / n_head / dim below override it
    n_layer: int | None = None
    n_head: int | None = None
    dim: int | None = None
    vocab_size: int = 16384  # VQ-16 codebook size
    block_size: int = 256  # codes per image: a 16 x 16 grid at 256 px
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label -> null class in training (classifier-free guidance)
    token_dropout_p: float = 0.1  # on the input embeddings (class token included)
    resid_dropout_p: float = 0.1  # on the attention output projection
    ffn_dropout_p: float = 0.1  # on the FFN output
    attn_dropout_p: float = 0.0  # on the attention probabilities
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    cls_token_num: int = 1
    initializer_range: float = 0.02
    gradient_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)

    def _size_entry(self) -> tuple[int, int, int]:
        return LLAMAGEN_SIZES.get(self.size, (0, 0, 0))  # an unknown size is reported by validate()

    @property
    def resolved_n_layer(self) -> int:
        return self.n_layer if self.n_layer is not None else self._size_entry()[0]

    @property
    def resolved_n_head(self) -> int:
        return self.n_head if self.n_head is not None else self._size_entry()[1]

    @property
    def resolved_dim(self) -> int:
        return self.dim if self.dim is not None else self._size_entry()[2]

    @property
    def head_dim(self) -> int:
        return self.resolved_dim // self.resolved_n_head

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the SwiGLU FFN, computed exactly as upstream FeedForward (int truncations included)."""
        hidden = int(SWIGLU_SHRINK_NUMERATOR * (FFN_EXPANSION * self.resolved_dim) / SWIGLU_SHRINK_DENOMINATOR)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of  # round up

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def null_class_id(self) -> int:
        """Row of the class table used for the unconditional branch of CFG (exists if class_dropout_prob > 0)."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    def validate(self) -> None:
        """Raise ConfigError naming the first unusable key (``model.llamagen.<field>``) and how to fix it."""
        if self.size not in LLAMAGEN_SIZES:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.size={self.size!r} is not a LlamaGen size; use one of "
                f"{sorted(LLAMAGEN_SIZES)} (n_layer, n_head and dim override its numbers)"
            )
        for name, value in (("n_layer", self.resolved_n_layer), ("n_head", self.resolved_n_head), ("dim", self.resolved_dim)):
            if value < 1:
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name}={value} must be a positive integer")
        if self.resolved_dim % self.resolved_n_head:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.dim={self.resolved_dim} is not divisible by n_head={self.resolved_n_head}; "
                "choose dim = n_head * head_dim"
            )
        if self.head_dim % ROPE_HEAD_DIM_DIVISOR:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.dim / n_head = {self.head_dim} must be a multiple of {ROPE_HEAD_DIM_DIVISOR} "
                "(2D RoPE rotates pairs in a row half and a column half); change dim or n_head"
            )
        for name in ("vocab_size", "num_classes", "multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name}={getattr(self, name)} must be a positive integer")
        if self.block_size < 1 or self.grid_size ** 2 != self.block_size:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.block_size={self.block_size} must be a square number of codes "
                "((image_size / 16) ** 2, e.g. 256 for 256 px with VQ-16)"
            )
        for name in ("class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p", "attn_dropout_p"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name}={value} must be a probability in [0, 1)")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(f"{CONFIG_KEY_PREFIX}.ffn_dim_multiplier={self.ffn_dim_multiplier} must be > 0 or null")
        for name in ("rope_base", "norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name}={getattr(self, name)} must be > 0")
        if self.cls_token_num != SUPPORTED_CLS_TOKEN_NUM:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.cls_token_num={self.cls_token_num}: class-conditional LlamaGen uses exactly "
                f"{SUPPORTED_CLS_TOKEN_NUM} class token; set it to {SUPPORTED_CLS_TOKEN_NUM}"
            )
