"""The taming-transformers convolution blocks that both VQ image tokenizers are built from.

Chameleon's VQGAN (``tokens/vqgan.py``) and LlamaGen's VQ-16 (``tokens/llamagen_vq.py``) both descend from
taming-transformers' ``Encoder`` / ``Decoder``: the same blocks, parameter names and op order, so each
tokenizer's released checkpoint loads with ``strict=True`` and decodes bit for bit as its reference.
No timestep embedding (taming's ``temb_channels = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32  # taming's Normalize(): GroupNorm(32 groups, eps 1e-6); channel counts must divide by it
NORM_EPS = 1e-6




def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1-conv q, k, v, proj_out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q = self.q(normed).reshape(b, c, h * w).transpose(1, 2)  # [B, hw, C]
        k = self.k(normed).reshape(b, c, h * w)  # [B, C, hw]
        v = self.v(normed).reshape(b, c, h * w)  # [B, C, hw]
        # Same op order as the reference (bmm, scale, softmax) so codes match it bit for bit on CPU.
        weights = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # [B, hw(query), hw(key)]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


def attention_block(channels: int, attn_type: str) -> nn.Module:
    """taming's ``make_attn``: "vanilla" = ``AttnBlock``, anything else (Chameleon: "none") = no attention."""
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        # stride-2 3x3 conv with no padding after a (0, 1, 0, 1) pad: halves H and W exactly
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)
