"""LlamaGen's blocks: 2D RoPE, the KV cache of sampling, RMSNorm, SwiGLU FFN, attention, the transformer block
and the class embedding (upstream ``autoregressive/models/gpt.py`` names, shapes and op order)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from arra_ds.model.llamagen.config import LlamaGenConfig

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
