"""LlamaGen's VQ-16 image tokenizer (VQModel: Encoder, l2-normalised VectorQuantizer, Decoder).

Parameter names follow upstream ``tokenizer/tokenizer_image/vq_model.py`` (FoundationVision/LlamaGen),
so the released ``vq_ds16_c2i.pt`` (weights under ``"model"``) loads with ``strict=True``:

    encoder.conv_in, encoder.conv_blocks.{level}.res.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.conv_blocks.{level}.attn.{j}.{norm,q,k,v,proj_out}   (last level only),
    encoder.conv_blocks.{level}.downsample.conv, encoder.mid.{0,1,2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.{0,1,2}, decoder.conv_blocks.{i}.res.{j} / attn.{j} / upsample.conv
    (i = 0 is the coarsest level), decoder.norm_out, decoder.conv_out,
    quantize.embedding.weight [codebook_size, 8], quantize.codebook_used [65536], quant_conv, post_quant_conv

Codes index the l2-normalised codebook: the latent of each 16 x 16 patch is l2-normalised and
assigned the nearest normalised codebook entry; decoding looks the normalised entries up again.

    vq = LlamaGenVQ.from_checkpoint("vq_ds16_c2i.pt")
    codes = vq.encode(pixels)        # pixels [B, 3, H, W] in [-1, 1] -> codes [B, H/16, W/16] int64
    pixels = vq.decode_codes(codes)  # codes [B, h, w] -> pixels [B, 3, 16h, 16w], about [-1, 1] (not clamped)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.tokens.taming import NORM_GROUPS, AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from arra_ds.weights import describe_keys, load_strict

CONFIG_KEY_PREFIX = "tokens.llamagen_vq"

# Length of upstream's `codebook_used` buffer (a rolling log of recent code ids, only written in
# training); persistent, so it is part of the checkpoint and must exist for a strict load.
CODEBOOK_USAGE_SLOTS = 65536
# Nearest-code search makes a [rows, codebook_size] fp32 distance matrix; this many rows per chunk
# bound it to 256 MB at 16384 codes.
CODE_SEARCH_ROWS_PER_CHUNK = 4096
# The checkpoint key upstream's vq_train.py saves the model weights under (sample_c2i.py reads it).
CHECKPOINT_WEIGHTS_KEY = "model"


class LlamaGenVQCheckpointError(UserError, ValueError):
    """A VQ checkpoint that does not fit the configured tokenizer; the message names the keys."""


@dataclass
class LlamaGenVQConfig:
    """VQ-16 architecture; defaults are upstream VQ_16 with ModelArgs defaults (vq_ds16_c2i.pt)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keeps the `quantize.codebook_used` buffer the checkpoint holds
    base_channels: int = 128  # upstream Encoder / Decoder `ch`
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level; stride = 2 ** (levels - 1)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def validate(self) -> None:
        """Raise ConfigError naming the key (``tokens.llamagen_vq.<field>``) and the fix."""
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            if not getattr(self, name):
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name} is empty; give one channel multiplier per level")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.encoder_ch_mult {list(self.encoder_ch_mult)} and decoder_ch_mult "
                f"{list(self.decoder_ch_mult)} need the same number of levels (the decoder undoes the encoder's stride)"
            )
        widths = {self.base_channels} | {self.base_channels * m for m in self.encoder_ch_mult + self.decoder_ch_mult}
        bad = sorted(w for w in widths if w < 1 or w % NORM_GROUPS)
        if bad:
            raise ConfigError(
                f"{CONFIG_KEY_PREFIX}.base_channels={self.base_channels} x ch_mult gives widths {bad}; every width "
                f"must be a positive multiple of {NORM_GROUPS} (the GroupNorm group count)"
            )
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "num_res_blocks", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{CONFIG_KEY_PREFIX}.{name}={getattr(self, name)} must be a positive integer")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ConfigError(f"{CONFIG_KEY_PREFIX}.dropout_p={self.dropout_p} must be a probability in [0, 1)")


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def _level(in_channels: int, out_channels: int, num_blocks: int, with_attention: bool, dropout: float) -> nn.Module:
    """One resolution level: `res` blocks, each followed by an attention block where `with_attention`."""
    level = nn.Module()
    level.res = nn.ModuleList()
    level.attn = nn.ModuleList()
    for block in range(num_blocks):
        level.res.append(ResnetBlock(in_channels if block == 0 else out_channels, out_channels, dropout))
        if with_attention:
            level.attn.append(AttnBlock(out_channels))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for index, res_block in enumerate(level.res):
        h = res_block(h)
        if len(level.attn):
            h = level.attn[index](h)
    return h


def _middle(channels: int, dropout: float) -> nn.ModuleList:
    """Res, attention, res at the coarsest resolution (upstream `mid`)."""
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    """pixels [B, in_channels, H, W] -> [B, z_channels, H / f, W / f]; attention only at the coarsest level."""

    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        ch, mult = config.base_channels, config.encoder_ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList()
        channels = ch
        for index, level_mult in enumerate(mult):
            coarsest = index == len(mult) - 1
            level = _level(channels, ch * level_mult, config.num_res_blocks, coarsest, config.dropout_p)
            channels = ch * level_mult
            if not coarsest:
                level.downsample = Downsample(channels, with_conv=True)
            self.conv_blocks.append(level)
        self.mid = _middle(channels, config.dropout_p)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for index, level in enumerate(self.conv_blocks):
            h = _run_level(level, h)
            if index != len(self.conv_blocks) - 1:
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> pixels [B, out_channels, f h, f w]; conv_blocks[0] is the coarsest level."""

    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        ch, mult = config.base_channels, config.decoder_ch_mult
        channels = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, channels, kernel_size=3, padding=1)
        self.mid = _middle(channels, config.dropout_p)
        self.conv_blocks = nn.ModuleList()
        # One more res block per level than the encoder, as upstream (and taming).
        for index, level_mult in enumerate(reversed(mult)):
            coarsest, finest = index == 0, index == len(mult) - 1
            level = _level(channels, ch * level_mult, config.num_res_blocks + 1, coarsest, config.dropout_p)
            channels = ch * level_mult
            if not finest:
                level.upsample = Upsample(channels, with_conv=True)
            self.conv_blocks.append(level)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for index, level in enumerate(self.conv_blocks):
            h = _run_level(level, h)
            if index != len(self.conv_blocks) - 1:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per latent vector; with l2_norm, latents and entries are unit vectors."""

    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        # Upstream init: uniform(+-1 / codebook_size), then normalised when the codebook is l2-normed.
        bound = 1.0 / config.codebook_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-bound, bound)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_SLOTS))

    def codebook(self) -> torch.Tensor:
        """The entries codes index: [codebook_size, embed_dim], l2-normalised if l2_norm."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, D, h, w] -> codes [B, h, w] int64: argmin of the squared l2 distance to the codebook."""
        batch, dim, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # [B*h*w, D]
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        book = self.codebook().to(flat.dtype)  # [K, D]
        book_sq = book.pow(2).sum(dim=1)  # [K]
        codes = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], CODE_SEARCH_ROWS_PER_CHUNK):
            rows = flat[start : start + CODE_SEARCH_ROWS_PER_CHUNK]
            # |z|^2 + |e|^2 - 2 z.e, upstream's expansion, so ties and rounding resolve the same way.
            distance = rows.pow(2).sum(dim=1, keepdim=True) + book_sq - 2 * rows @ book.t()
            codes[start : start + rows.shape[0]] = distance.argmin(dim=1)
        return codes.view(batch, height, width)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> quantised latents [B, D, h, w] (normalised entries if l2_norm)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------


class LlamaGenVQ(nn.Module):
    """LlamaGen VQ-16 tokenizer. Built in eval mode: it is used frozen."""

    def __init__(self, config: LlamaGenVQConfig | None = None):
        super().__init__()
        config = config or LlamaGenVQConfig()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)
        self.eval()

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> pre-quantisation latents [B, embed_dim, H / f, W / f]."""
        stride = self.downsample_factor
        if pixels.dim() != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.config.in_channels}, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % stride or pixels.shape[3] % stride:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} must be a multiple of the tokenizer stride {stride}")
        weight = self.quant_conv.weight
        return self.quant_conv(self.encoder(pixels.to(device=weight.device, dtype=weight.dtype)))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, H / 16, W / 16] int64."""
        return self.quantize.nearest_codes(self.latents(pixels))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] int -> pixels [B, 3, 16 h, 16 w]: the raw decoder output (about [-1, 1]), as upstream."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, h, w], got shape {tuple(codes.shape)}")
        codes = codes.to(self.quantize.embedding.weight.device).long()
        size = self.config.codebook_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"codes must lie in [0, {size}), got [{codes.min().item()}, {codes.max().item()}]")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``decode_codes``, under the name every image decoder has (``model/interface.py`` ImageDecoder)."""
        return self.decode_codes(codes)

    # ---- loading --------------------------------------------------------------------------------
    def load_upstream_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strict load of upstream-named tensors; LlamaGenVQCheckpointError names missing / extra / mis-shaped keys."""
        load_strict(
            self, state, source=source, what="the LlamaGen VQ tokenizer of this config", error=LlamaGenVQCheckpointError,
            hint=f"Use upstream's VQ-16 checkpoint (vq_ds16_c2i.pt) or set {CONFIG_KEY_PREFIX}.* (codebook_size, "
            "codebook_embed_dim, base_channels, *_ch_mult) to the model it was trained with",
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: LlamaGenVQConfig | None = None) -> LlamaGenVQ:
        """Build (default config: VQ-16) and strictly load upstream weights from `path` (under "model", or top level)."""
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"LlamaGen VQ checkpoint {path} not found (upstream releases it as vq_ds16_c2i.pt)")
        try:
            # Upstream training checkpoints also pickle their argparse `args`; nothing else is allowed.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for foreign objects, RuntimeError / EOFError for damaged files
            raise LlamaGenVQCheckpointError(
                f"cannot read LlamaGen VQ checkpoint {path}: {error}. It must be a torch.save file of tensors "
                f"(optionally under {CHECKPOINT_WEIGHTS_KEY!r})"
            ) from error
        if not isinstance(checkpoint, Mapping):
            raise LlamaGenVQCheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a mapping of tensors")
        weights = checkpoint.get(CHECKPOINT_WEIGHTS_KEY)
        state = weights if isinstance(weights, Mapping) else checkpoint
        not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
        if not_tensors:
            raise LlamaGenVQCheckpointError(
                f"{path}: entries {describe_keys(not_tensors)} are not tensors; expected the tokenizer weights "
                f"under {CHECKPOINT_WEIGHTS_KEY!r} (as upstream vq_train.py saves them) or at the top level"
            )
        model = cls(config)
        model.load_upstream_state(state, source=str(path))
        return model


__all__ = [
    "LlamaGenVQ",
    "LlamaGenVQCheckpointError",
    "LlamaGenVQConfig",
    "VectorQuantizer",
]
