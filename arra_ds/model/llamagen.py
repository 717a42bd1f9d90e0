"""LlamaGen's class-conditional GPT (c2i), trainable from scratch and loadable from the released weights.

Parameter names, shapes, initialisation, 2D RoPE and dropout placement follow upstream
``autoregressive/models/gpt.py`` (FoundationVision/LlamaGen), so a released ``c2i_B_256.pt`` loads
with ``strict=True`` through ``load_llamagen_checkpoint``:

    cls_embedding.embedding_table.weight     [num_classes + 1, dim]   (+1: the null class of CFG)
    tok_embeddings.weight                    [vocab_size, dim]
    layers.{i}.attention.wqkv.weight         [3 * dim, dim]
    layers.{i}.attention.wo.weight           [dim, dim]
    layers.{i}.feed_forward.w1 / w3.weight   [ffn_dim, dim]
    layers.{i}.feed_forward.w2.weight        [dim, ffn_dim]
    layers.{i}.attention_norm / ffn_norm.weight, norm.weight   [dim]
    output.weight                            [vocab_size, dim]

The sequence is ``[class token, code_0, ..., code_{T-1}]`` (codes in raster order over the
``grid x grid`` latent map); the hidden state at sequence index ``t`` predicts ``code_t``.

    model = LlamaGenGPT(LlamaGenConfig(size="B"))
    hidden = model.forward_hidden(class_ids, codes[:, :-1])   # [B, T, dim]: teacher forcing as upstream
    logits = model.logits(hidden)                             # [B, T, vocab] fp32; targets = codes

    logits, cache = model.prefill(class_ids)                  # sampling: logits for code_0
    logits, cache = model.decode_step(code_0, cache, position=0)   # logits for code_1, ...
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.model.interface import (
    BackboneAdapter,
    GatherContext,
    LMHeadWithLoss,
    PartitionContext,
    SequenceView,
    no_gather,
    no_partitioning,
)
from arra_ds.tokens.layout import IGNORE_INDEX

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

# Checkpoint containers upstream writes or reads (sample_c2i.py): DDP "model", DeepSpeed "module",
# Lightning-style "state_dict"; otherwise the file is the state dict itself (FSDP export).
CHECKPOINT_WEIGHT_KEYS = ("model", "module", "state_dict")
# Tensors that some LlamaGen variants save but that are recomputed here: the RoPE table (a buffer in
# upstream's serve/ and HF variants, dropped by their loaders) and KV-cache buffers of a model saved
# after `setup_caches`.
DERIVED_KEY_NAMES = ("freqs_cis",)
DERIVED_KEY_FRAGMENT = ".attention.kv_cache."
# How many key names an error message lists before "...".
KEYS_SHOWN_IN_ERRORS = 8


class LlamaGenCheckpointError(UserError, ValueError):
    """A LlamaGen checkpoint whose tensors do not match the configured model; the message names the keys."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# 2D rotary position embedding
# ------------------------------------------------------------------------------------------------


def build_2d_rope_table(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """cos / sin table [cls_token_num + grid_size**2, head_dim // 2, 2] (fp32), upstream precompute_freqs_cis_2d.

    Rotation pair k (elements 2k, 2k+1 of a head) of the code at (row r, column c), index
    ``cls_token_num + r * grid_size + c``, turns by ``r * base ** (-2k / (head_dim / 2))`` for the first
    head_dim / 4 pairs and by ``c * base ** (-2k' / (head_dim / 2))`` (k' = k - head_dim / 4) for the rest.
    The class-token rows are all zeros (cos = sin = 0), as upstream: the class token's query and key are
    zeroed, so every query gives it attention logit 0, while its value still flows.
    """
    half_dim = head_dim // 2
    inverse_frequencies = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    steps = torch.arange(grid_size)
    angles = torch.outer(steps, inverse_frequencies)  # [grid, head_dim // 4]
    angle_grid = torch.cat(
        [
            angles[:, None, :].expand(-1, grid_size, -1),  # row angle, constant along a row
            angles[None, :, :].expand(grid_size, -1, -1),  # column angle
        ],
        dim=-1,
    )  # [grid (row), grid (column), head_dim // 2]
    table = torch.stack([torch.cos(angle_grid), torch.sin(angle_grid)], dim=-1).flatten(0, 1)
    class_rows = torch.zeros(cls_token_num, half_dim, 2)
    return torch.cat([class_rows, table])


def apply_2d_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, n_head, head_dim] by table [S, head_dim // 2, 2] (computed in fp32, returned in x's dtype)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, head_dim // 2, 2]
    rotation = table.view(1, pairs.shape[1], 1, pairs.shape[3], 2)
    cos, sin = rotation[..., 0], rotation[..., 1]
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return rotated.flatten(3).type_as(x)


# ------------------------------------------------------------------------------------------------
# KV cache for sampling
# ------------------------------------------------------------------------------------------------


@dataclass
class LlamaGenKVCache:
    """Keys / values of every layer for incremental decoding; rows are independent (CFG rows included).

    ``keys[i]`` / ``values[i]``: [B, n_head, capacity, head_dim], allocated on the first write with the
    dtype of the keys (so autocast decoding caches bf16). ``length`` tokens are filled (class token first).
    """

    capacity: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_head, S, head_dim] at [start, start + S); return all keys / values up to there."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; writing up to {end} does not fit")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as upstream)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), dropout on the output."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        dim, hidden = config.resolved_dim, config.ffn_dim
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """Causal multi-head self-attention with fused qkv, 2D RoPE on q and k, SDPA (flash on GPU)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.dim = config.resolved_dim
        self.n_head = config.resolved_n_head
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(self.dim, 3 * self.dim, bias=False)  # rows: q, then k, then v
        self.wo = nn.Linear(self.dim, self.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: LlamaGenKVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        """x [B, S, dim], rope [S, head_dim // 2, 2] -> [B, S, dim].

        Without a cache, S tokens attend causally among themselves. With one, they are written at
        ``cache.length`` and attend to everything cached so far (S > 1 only for an empty cache).
        """
        batch, seq_len, _ = x.shape
        q, k, v = self.wqkv(x).split(self.dim, dim=-1)
        q = apply_2d_rope(q.view(batch, seq_len, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_2d_rope(k.view(batch, seq_len, self.n_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, S, head_dim]
        if cache is not None:
            if seq_len > 1 and cache.length > 0:
                raise ValueError("a multi-token step needs an empty KV cache (causal masking assumes start 0)")
            k, v = cache.write(layer_index, cache.length, k, v)
        # A single new token may see every cached key, so only multi-token steps need the causal mask.
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=seq_len > 1, dropout_p=self.attn_dropout_p if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, seq_len, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)). Output [B, S, dim] (what a hook sees)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.resolved_dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.resolved_dim, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: LlamaGenKVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, layer_index)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """Class label -> one embedding token [B, 1, dim]; row ``num_classes`` is the null class (if dropout > 0)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_to_null_class(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability dropout_prob (global torch RNG)."""
        dropped = torch.rand(class_ids.shape[0], device=class_ids.device) < self.dropout_prob
        return torch.where(dropped, torch.full_like(class_ids, self.num_classes), class_ids)

    def forward(self, class_ids: torch.Tensor, drop_labels: bool) -> torch.Tensor:
        if drop_labels and self.dropout_prob > 0:
            class_ids = self.drop_to_null_class(class_ids)
        return self.embedding_table(class_ids).unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class LlamaGenGPT(nn.Module):
    """LlamaGen c2i GPT. ``layers[i]``'s forward output is the hidden state after block i + 1."""

    def __init__(self, config: LlamaGenConfig, initialize: bool = True):
        """``initialize=False`` leaves the weights as the layers create them: for a caller that runs
        ``initialize_weights(gather)`` itself (parameters partitioned at creation under ZeRO-3) or loads
        a checkpoint next."""
        super().__init__()
        config.validate()
        self.config = config
        dim = config.resolved_dim
        self.cls_embedding = ClassEmbedding(config.num_classes, dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.resolved_n_layer))
        self.norm = RMSNorm(dim, eps=config.norm_eps)
        self.output = nn.Linear(dim, config.vocab_size, bias=False)
        # A plain fp32 attribute, not a buffer (as upstream): it stays out of the state dict and is not
        # cast by model.to(bf16) / DeepSpeed's bf16 engine, so rotations are computed from fp32 cos / sin.
        self.rope_table = build_2d_rope_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        if initialize:
            self.initialize_weights()

    def initialize_weights(self, gather: GatherContext = no_gather) -> None:
        """Upstream init: Linear / Embedding weights ~ N(0, initializer_range), biases 0, LM head all zeros.

        Each layer's weights are drawn inside ``gather`` (under ZeRO-3 they are partitioned as soon as
        the layer exists, whole only inside the gather; rank 0's draw is kept).
        """
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if not isinstance(module, (nn.Linear, nn.Embedding)):
                    continue
                with gather(list(module.parameters(recurse=False))):
                    if module is self.output:
                        nn.init.zeros_(module.weight)
                    else:
                        nn.init.normal_(module.weight, mean=0.0, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)

    @property
    def null_class_id(self) -> int:
        return self.config.null_class_id

    def _rope(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Rows [start, start + length) of the RoPE table on `device`: [length, head_dim // 2, 2]."""
        if self.rope_table.device != device or self.rope_table.dtype != torch.float32:
            # (zero.Init casts floating tensors created while the model is built to the training dtype)
            self.rope_table = self.rope_table.to(device=device, dtype=torch.float32)
        return self.rope_table[start : start + length]

    def _check_inputs(self, class_ids: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        if class_ids.dim() != 1:
            raise ValueError(f"class_ids must be [B], got shape {tuple(class_ids.shape)}")
        if codes is None:
            return
        if codes.dim() != 2 or codes.shape[0] != class_ids.shape[0]:
            raise ValueError(f"codes must be [B={class_ids.shape[0]}, T], got shape {tuple(codes.shape)}")
        if codes.shape[1] > self.config.block_size:
            raise ValueError(f"{codes.shape[1]} codes exceed block_size={self.config.block_size}")

    # ---- training / teacher forcing --------------------------------------------------------------
    def forward_hidden(self, class_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """class_ids [B] int64, codes [B, T] int64 (T <= block_size) -> hidden [B, 1 + T, dim] after the final norm.

        Sequence index 0 is the class token; index t predicts codes[:, t]. Upstream trains on
        ``codes[:, :-1]`` so that the T outputs predict all T codes. In training mode labels go to the
        null class with probability class_dropout_prob; in eval mode never.
        """
        self._check_inputs(class_ids, codes)
        class_token = self.cls_embedding(class_ids, drop_labels=self.training)  # [B, 1, dim]
        tokens = torch.cat([class_token, self.tok_embeddings(codes)], dim=1)  # [B, 1 + T, dim]
        h = self.tok_dropout(tokens)
        rope = self._rope(0, h.shape[1], h.device)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # A hook on a block fires once per forward even when it is recomputed: torch's non-reentrant
            # recompute stops early, after the block's last saved tensor and before the block returns.
            # Hooks on modules inside a block (attention, feed_forward) do fire again in backward.
            h = checkpoint(layer, h, rope, use_reentrant=False) if recompute else layer(h, rope)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim] -> logits [..., vocab_size] in fp32 (as upstream, for the cross-entropy)."""
        return self.output(hidden).float()

    def forward(self, class_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """class_ids [B], codes [B, T] -> logits [B, 1 + T, vocab_size] (fp32)."""
        return self.logits(self.forward_hidden(class_ids, codes))

    # ---- sampling --------------------------------------------------------------------------------
    def _cached_step(self, tokens: torch.Tensor, cache: LlamaGenKVCache) -> torch.Tensor:
        """tokens [B, S, dim] at sequence indices [cache.length, + S) -> logits of the last one [B, vocab]."""
        h = self.tok_dropout(tokens)
        rope = self._rope(cache.length, h.shape[1], h.device)
        for index, layer in enumerate(self.layers):
            h = layer(h, rope, cache, index)
        cache.length += h.shape[1]
        return self.logits(self.norm(h[:, -1]))

    def prefill(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, LlamaGenKVCache]:
        """class_ids [B] -> (logits for code 0 [B, vocab_size] fp32, a new cache holding the class token).

        Labels are never dropped here. For classifier-free guidance pass conditional and
        unconditional rows in one batch, e.g. ``torch.cat([labels, torch.full_like(labels,
        model.null_class_id)])``, feed every sampled code to both halves, and combine the logits as
        ``uncond + scale * (cond - uncond)`` (upstream generate.py).
        """
        self._check_inputs(class_ids)
        capacity = self.config.cls_token_num + self.config.block_size
        cache = LlamaGenKVCache(capacity, [None] * len(self.layers), [None] * len(self.layers))
        class_token = self.cls_embedding(class_ids, drop_labels=False)
        return self._cached_step(class_token, cache), cache

    def decode_step(
        self, codes: torch.Tensor, cache: LlamaGenKVCache, position: int
    ) -> tuple[torch.Tensor, LlamaGenKVCache]:
        """Feed code number `position` (codes [B] int64) -> (logits for code position + 1 [B, vocab_size], cache).

        ``position`` counts codes from 0 in raster order; the cache must hold exactly the class token
        and codes 0 .. position - 1. The cache is updated in place and returned.
        """
        expected = cache.length - self.config.cls_token_num
        if position != expected:
            raise ValueError(f"decode_step(position={position}) but the cache holds codes up to {expected - 1}")
        if codes.dim() != 1:
            raise ValueError(f"codes must be [B], got shape {tuple(codes.shape)}")
        return self._cached_step(self.tok_embeddings(codes)[:, None], cache), cache


# ------------------------------------------------------------------------------------------------
# The ARRA interface (model/interface.py): ARRA-Base trains this model from scratch
# ------------------------------------------------------------------------------------------------

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
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _read_checkpoint_file(path: Path) -> object:
    """torch.load with weights_only=True; upstream training checkpoints also pickle their argparse ``args``."""
    if not path.is_file():
        raise InputNotFoundError(f"LlamaGen checkpoint {path} not found (e.g. c2i_B_256.pt from the LlamaGen release)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for foreign objects, RuntimeError / EOFError for damaged files
        raise LlamaGenCheckpointError(
            f"cannot read LlamaGen checkpoint {path}: {error}. It must be a torch.save file of tensors "
            "(optionally under 'model' / 'module' / 'state_dict'); re-save just the state dict if it pickles other objects"
        ) from error


def extract_llamagen_state_dict(
    checkpoint: Mapping[str, object], source: str, weights_key: str | None = None
) -> dict[str, torch.Tensor]:
    """The model tensors of a loaded checkpoint: under `weights_key` if given, else 'model' / 'module' /
    'state_dict', else the mapping itself; RoPE / KV-cache tensors that some variants save are dropped."""
    if weights_key is not None:
        if not isinstance(checkpoint.get(weights_key), Mapping):
            raise LlamaGenCheckpointError(
                f"{source} has no tensor mapping under {weights_key!r}; its top-level keys are {sorted(checkpoint)[:KEYS_SHOWN_IN_ERRORS]}"
            )
        state = checkpoint[weights_key]
    else:
        containers = [key for key in CHECKPOINT_WEIGHT_KEYS if isinstance(checkpoint.get(key), Mapping)]
        state = checkpoint[containers[0]] if containers else checkpoint
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise LlamaGenCheckpointError(
            f"{source}: entries {not_tensors[:KEYS_SHOWN_IN_ERRORS]} are not tensors; point weights_key at the "
            f"model weights (upstream saves them under one of {list(CHECKPOINT_WEIGHT_KEYS)})"
        )
    return {
        key: value
        for key, value in state.items()
        if key not in DERIVED_KEY_NAMES and DERIVED_KEY_FRAGMENT not in key
    }


def _describe_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:KEYS_SHOWN_IN_ERRORS])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > KEYS_SHOWN_IN_ERRORS else ''}]"


def load_llamagen_checkpoint(
    model: LlamaGenGPT,
    path_or_state: str | Path | Mapping[str, object],
    weights_key: str | None = None,
) -> None:
    """Load upstream-layout weights into `model` with strict=True (every key present, no extra, same shapes).

    `path_or_state`: a checkpoint file, or an already loaded checkpoint / state dict. Raises
    LlamaGenCheckpointError naming the missing / unexpected / mis-shaped keys.
    """
    if isinstance(path_or_state, (str, Path)):
        source = str(path_or_state)
        checkpoint = _read_checkpoint_file(Path(path_or_state))
    else:
        source, checkpoint = "the given LlamaGen state dict", path_or_state
    if not isinstance(checkpoint, Mapping):
        raise LlamaGenCheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a mapping of tensors")
    state = extract_llamagen_state_dict(checkpoint, source, weights_key)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    size = f"size={model.config.size!r}, n_layer={model.config.resolved_n_layer}, dim={model.config.resolved_dim}"
    if missing or unexpected:
        raise LlamaGenCheckpointError(
            f"{source} does not match LlamaGenGPT({size}): missing keys {_describe_keys(missing)}, "
            f"unexpected keys {_describe_keys(unexpected)}. Check model.llamagen.size / n_layer against the checkpoint"
        )
    mis_shaped = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if mis_shaped:
        raise LlamaGenCheckpointError(
            f"{source} has tensors of other shapes than LlamaGenGPT({size}): {mis_shaped[:KEYS_SHOWN_IN_ERRORS]}. "
            "Check model.llamagen.size / dim / vocab_size / num_classes / class_dropout_prob against the checkpoint"
        )
    model.load_state_dict(state, strict=True)


__all__ = [
    "LLAMAGEN_SIZES",
    "LlamaGenAdapter",
    "LlamaGenCheckpointError",
    "LlamaGenConfig",
    "LlamaGenGPT",
    "LlamaGenKVCache",
    "apply_2d_rope",
    "build_2d_rope_table",
    "build_llamagen_backbone",
    "extract_llamagen_state_dict",
    "load_llamagen_checkpoint",
]
