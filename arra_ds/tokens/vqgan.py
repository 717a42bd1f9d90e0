"""The Chameleon image tokenizer: a VQGAN (encoder, vector quantizer, decoder).

Parameter names and shapes follow the original Chameleon tokenizer checkpoint (``vqgan.ckpt`` +
``vqgan.yaml``, the taming-transformers ``VQModel`` layout that Lumina-mGPT ships under
``ckpts/chameleon/tokenizer/``), so that file loads with ``strict=True``:

    encoder.conv_in, encoder.down[i].block[j].{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down[i].attn[j].{norm,q,k,v,proj_out}, encoder.down[i].downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up[i].block[j].*, decoder.up[i].attn[j].*,
    decoder.up[i].upsample.conv, decoder.norm_out, decoder.conv_out,
    quantize.embedding, quant_conv, post_quant_conv

A Hugging Face Chameleon checkpoint carries the same encoder / quantizer under ``model.vqmodel.*``
(no decoder); ``VQGAN.from_hf`` reads those for encoding.

    vq = VQGAN.from_original("vqgan.yaml", "vqgan.ckpt")
    codes = vq.encode(pixels)        # pixels [B, 3, H, W] in [-1, 1] -> codes [B, H/16, W/16] int64
    pixels = vq.decode(codes)        # codes [B, h, w] -> pixels [B, 3, 16h, 16w] in [-1, 1]
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from arra_ds.errors import UserError
from arra_ds.tokens.taming import NORM_GROUPS, Downsample, ResnetBlock, Upsample, attention_block, group_norm
from arra_ds.weights import load_strict, read_safetensors_prefixed

logger = logging.getLogger(__name__)

HF_VQ_PREFIX = "model.vqmodel."
# Keys of a taming/Lightning VQGAN checkpoint that only training uses (LPIPS + patch discriminator).
TRAINING_ONLY_PREFIXES = ("loss.",)
# The quantizer's distance matrix is [rows, n_embed] fp32; rows per chunk bound its memory (~256 MB at 8192 codes).
QUANTIZE_ROWS_PER_CHUNK = 8192


class VQGANError(UserError, ValueError):
    """A VQGAN file or config that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------
# Config: the ``model.params`` section of vqgan.yaml (taming names), or HF's ``vq_config``
# ------------------------------------------------------------------------------------------------

# ddconfig keys of taming's Encoder/Decoder that change nothing at inference time.
_IGNORED_DDCONFIG_KEYS = {"give_pre_end"}
# model.params keys that only matter for training or for taming's own loading.
_IGNORED_PARAMS_KEYS = {
    "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor",
    "scheduler_config", "lr_g_factor", "sane_index_shape", "base_learning_rate",
}
# HF ChameleonVQVAEConfig name -> taming name (as in transformers' convert_chameleon_weights_to_hf.py).
_HF_TO_TAMING = {
    "embed_dim": "embed_dim",
    "num_embeddings": "n_embed",
    "double_latent": "double_z",
    "latent_channels": "z_channels",
    "resolution": "resolution",
    "in_channels": "in_channels",
    "out_channels": "out_ch",
    "base_channels": "ch",
    "channel_multiplier": "ch_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "attn_type": "attn_type",
}


@dataclass
class VQGANConfig:
    """Architecture of the VQGAN. Defaults are Chameleon's ``vqgan.yaml`` (f=16, 8192 codes)."""

    n_embed: int = 8192  # codebook size
    embed_dim: int = 256  # codebook vector width
    z_channels: int = 256  # encoder output / decoder input channels
    double_z: bool = False
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution level; f = 2 ** (levels - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (relative to `resolution`) with attention
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    resamp_with_conv: bool = True
    attn_type: Literal["vanilla", "none"] = "vanilla"
    tanh_out: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in (self.attn_resolutions or ()))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self, source: str = "VQGAN config") -> None:
        if not self.ch_mult:
            raise VQGANError(f"{source}: ch_mult is empty; it needs one multiplier per resolution level")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        bad = sorted({w for w in widths if w < 1 or w % NORM_GROUPS})
        if bad:
            raise VQGANError(
                f"{source}: channel counts {bad} (ch={self.ch} x ch_mult={list(self.ch_mult)}) must be positive "
                f"multiples of {NORM_GROUPS}, the GroupNorm group count of the Chameleon VQGAN"
            )
        if min(self.n_embed, self.embed_dim, self.z_channels, self.in_channels, self.out_ch) < 1:
            raise VQGANError(f"{source}: n_embed, embed_dim, z_channels, in_channels, out_ch must be >= 1")
        if self.num_res_blocks < 0:
            raise VQGANError(f"{source}: num_res_blocks={self.num_res_blocks} must be >= 0")
        if self.num_res_blocks == 0 and len(set(self.ch_mult)) > 1:
            raise VQGANError(f"{source}: with num_res_blocks=0 no layer changes the width, so ch_mult must be constant")
        if self.attn_type not in ("vanilla", "none"):
            raise VQGANError(f"{source}: attn_type={self.attn_type!r}; only 'vanilla' and 'none' exist in Chameleon")

    # ---- taming / Chameleon yaml ---------------------------------------------------------------
    @classmethod
    def from_yaml_params(cls, params: Mapping[str, Any], source: str = "vqgan.yaml") -> "VQGANConfig":
        """Build from the ``model.params`` mapping of a taming ``vqgan.yaml``."""
        params = dict(params)
        if params.get("remap") is not None:
            raise VQGANError(f"{source}: model.params.remap is set; remapped codebooks are not Chameleon's layout")
        unknown = set(params) - _IGNORED_PARAMS_KEYS - {"n_embed", "embed_dim", "ddconfig", "remap"}
        if unknown:
            raise VQGANError(f"{source}: unknown model.params keys {sorted(unknown)}")
        for key in ("n_embed", "embed_dim", "ddconfig"):
            if key not in params:
                raise VQGANError(f"{source}: model.params.{key} is missing")
        dd = dict(params["ddconfig"])
        if dd.pop("use_linear_attn", False):
            raise VQGANError(f"{source}: ddconfig.use_linear_attn=true is not part of the Chameleon VQGAN")
        for key in _IGNORED_DDCONFIG_KEYS:
            dd.pop(key, None)
        names = {f.name for f in fields(cls)}
        unknown = set(dd) - names
        if unknown:
            raise VQGANError(f"{source}: unknown model.params.ddconfig keys {sorted(unknown)}; known: {sorted(names)}")
        cfg = cls(n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), **dd)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "VQGANConfig":
        path = Path(path)
        if not path.is_file():
            raise VQGANError(f"VQGAN config {path} not found (Chameleon ships it as tokenizer/vqgan.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise VQGANError(f"{path} is not valid YAML: {e}") from e
        try:
            params = data["model"]["params"]
        except (TypeError, KeyError):
            raise VQGANError(f"{path}: expected a taming config with model.params (embed_dim, n_embed, ddconfig)") from None
        return cls.from_yaml_params(params, source=str(path))

    def to_yaml_dict(self) -> dict:
        """The ``vqgan.yaml`` content (taming layout), as Chameleon writes it."""
        dd = asdict(self)
        n_embed, embed_dim = dd.pop("n_embed"), dd.pop("embed_dim")
        dd["ch_mult"] = list(self.ch_mult)
        dd["attn_resolutions"] = list(self.attn_resolutions)
        return {
            "model": {
                "target": "taming.models.vqgan.VQModel",
                "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd},
            }
        }

    # ---- Hugging Face ChameleonVQVAEConfig --------------------------------------------------------
    @classmethod
    def from_hf_vq_config(cls, vq_config: Mapping[str, Any], source: str = "config.json vq_config") -> "VQGANConfig":
        kwargs = {}
        for hf_name, taming_name in _HF_TO_TAMING.items():
            if vq_config.get(hf_name) is not None:
                kwargs[taming_name] = vq_config[hf_name]
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def to_hf_vq_config(self) -> dict:
        taming = asdict(self)
        out = {hf: taming[t] for hf, t in _HF_TO_TAMING.items() if t in taming}
        out["channel_multiplier"] = list(self.ch_mult)
        out["attn_resolutions"] = list(self.attn_resolutions)
        return out


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, z_channels (x2 if double_z), H/f, W/f]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        resolution = cfg.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            channels = cfg.ch * in_mult[level]
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(channels, cfg.ch * mult, cfg.dropout))
                channels = cfg.ch * mult
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(attention_block(channels, cfg.attn_type))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(channels, cfg.resamp_with_conv)
                resolution //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = attention_block(channels, cfg.attn_type)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        self.norm_out = group_norm(channels)
        out_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != len(self.down) - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, out_ch, f*h, f*w]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.tanh_out = cfg.tanh_out
        levels = len(cfg.ch_mult)
        channels = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = attention_block(channels, cfg.attn_type)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                channels = cfg.ch * cfg.ch_mult[level]
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(attention_block(channels, cfg.attn_type))
            if level != 0:
                stage.upsample = Upsample(channels, cfg.resamp_with_conv)
                resolution *= 2
            stages.insert(0, stage)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry lookup (taming's VectorQuantizer2 at inference; no remap)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> codes [B, h, w] int64 (argmin of squared L2 distance)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
        book = self.embedding.weight.to(flat.dtype)  # [K, D]
        book_sq = book.pow(2).sum(dim=1)  # [K]
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], QUANTIZE_ROWS_PER_CHUNK):
            rows = flat[start : start + QUANTIZE_ROWS_PER_CHUNK]
            # |z|^2 + |e|^2 - 2 z.e, the reference's expansion (argmin ties resolve as there)
            dist = rows.pow(2).sum(dim=1, keepdim=True) + book_sq - 2 * torch.einsum("bd,dn->bn", rows, book.t())
            out[start : start + rows.shape[0]] = dist.argmin(dim=1)
        return out.view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> quantized latents [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# Checkpoint reading
# ------------------------------------------------------------------------------------------------


def _inert_stand_in(qualified_name: str) -> type:
    """A class that absorbs construction and state: stands in for a non-tensor pickled object."""

    module, _, name = qualified_name.rpartition(".")

    class Skipped:
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __repr__(self) -> str:
            return f"<skipped {qualified_name}>"

    Skipped.__module__, Skipped.__qualname__, Skipped.__name__ = module, name, name
    return Skipped


def load_checkpoint_tensors(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``, also for PyTorch Lightning checkpoints.

    A Lightning ``.ckpt`` may pickle non-tensor objects (callbacks, hyper-parameter containers) that
    the weights-only unpickler refuses. We never unpickle those for real: each such global is mapped
    to an inert stand-in class (no code of the checkpoint runs), so the tensors load safely and the
    other entries come back as placeholders.
    """
    path = Path(path)
    if not path.is_file():
        raise VQGANError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # weights-only refusal (UnpicklingError) or a corrupt file
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            raise VQGANError(f"cannot read checkpoint {path}: {first_error}") from first_error
        if not names:
            raise VQGANError(f"cannot read checkpoint {path}: {first_error}") from first_error
        stand_ins = [(_inert_stand_in(n), n) for n in names]
        logger.info("%s: %d non-tensor globals replaced by inert stand-ins: %s", path, len(names), names)
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)


def _read_hf_vq_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The ``model.vqmodel.*`` tensors of a HF checkpoint dir (safetensors or .bin, sharded or not)."""
    if any(checkpoint_dir.glob("*.safetensors")):
        tensors = read_safetensors_prefixed(checkpoint_dir, HF_VQ_PREFIX)
        return {key[len(HF_VQ_PREFIX) :]: value for key, value in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint_dir.glob("pytorch_model*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        out.update({k[len(HF_VQ_PREFIX) :]: v for k, v in state.items() if k.startswith(HF_VQ_PREFIX)})
    return out


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class VQGAN(nn.Module):
    """Chameleon VQGAN. ``with_decoder=False`` builds the encode-only half (what HF checkpoints hold)."""

    def __init__(self, cfg: VQGANConfig, with_decoder: bool = True):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg) if with_decoder else None
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)
        self.source = "<random init>"
        self.channels_last = False
        self.eval()

    def use_channels_last(self) -> "VQGAN":
        """NHWC convolutions: ~2x faster on CPU (oneDNN) and with bf16 on GPU. Codes can differ from
        the default layout only where two codebook entries are equally near (float rounding)."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def num_codes(self) -> int:
        return self.config.n_embed

    # ---- inference ------------------------------------------------------------------------------
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> pre-quantization latents [B, embed_dim, H/f, W/f]."""
        f = self.downsample_factor
        if pixels.dim() != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.config.in_channels}, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} must be a multiple of the VQGAN stride {f}")
        weight = self.quant_conv.weight
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.quant_conv(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, H/f, W/f] int64."""
        return self.quantize.codes(self.latents(pixels))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] (int) -> pixels [B, 3, f*h, f*w] clamped to [-1, 1]."""
        if self.decoder is None:
            raise VQGANError(
                f"this VQGAN ({self.source}) has no decoder: Hugging Face Chameleon checkpoints hold the encoder "
                "only. Load the original tokenizer files with VQGAN.from_original(vqgan.yaml, vqgan.ckpt)."
            )
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, h, w], got {tuple(codes.shape)}")
        codes = codes.to(self.quantize.embedding.weight.device).long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        quant = self.quantize.lookup(codes)
        if self.channels_last:
            quant = quant.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(quant)).clamp(-1.0, 1.0).contiguous()

    # ---- loading / saving --------------------------------------------------------------------
    def _load_strict(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        load_strict(self, state, source=source, what="the VQGAN built from its config", error=VQGANError,
                    hint="Is the yaml the one of this checkpoint?")
        self.source = source

    @classmethod
    def from_original(cls, yaml_path: str | Path, ckpt_path: str | Path) -> "VQGAN":
        """Load Chameleon's ``vqgan.yaml`` + ``vqgan.ckpt`` (strict: every model key must be present)."""
        cfg = VQGANConfig.from_yaml(yaml_path)
        checkpoint = load_checkpoint_tensors(ckpt_path)
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise VQGANError(f"{ckpt_path}: expected a dict with a 'state_dict' of tensors")
        training_only = [k for k in state if k.startswith(TRAINING_ONLY_PREFIXES)]
        if training_only:
            logger.info("%s: ignoring %d training-only tensors (%s*)", ckpt_path, len(training_only), TRAINING_ONLY_PREFIXES)
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        model = cls(cfg, with_decoder=True)
        model._load_strict(state, source=str(ckpt_path))
        return model

    @classmethod
    def from_hf(cls, checkpoint_dir: str | Path) -> "VQGAN":
        """Encoder + quantizer from a Hugging Face Chameleon checkpoint dir (``model.vqmodel.*``)."""
        checkpoint_dir = Path(checkpoint_dir)
        config_path = checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise VQGANError(f"{checkpoint_dir}: no config.json; point at a Hugging Face Chameleon checkpoint dir")
        vq_config = json.loads(config_path.read_text()).get("vq_config")
        if not vq_config:
            raise VQGANError(f"{config_path} has no 'vq_config'; is it a Chameleon / Lumina-mGPT checkpoint?")
        cfg = VQGANConfig.from_hf_vq_config(vq_config, source=f"{config_path} vq_config")
        state = _read_hf_vq_tensors(checkpoint_dir)
        if not state:
            raise VQGANError(f"{checkpoint_dir}: no '{HF_VQ_PREFIX}*' tensors in its weight files")
        model = cls(cfg, with_decoder=False)
        model._load_strict(state, source=f"{checkpoint_dir} ({HF_VQ_PREFIX}*)")
        return model

    def save_original(self, yaml_path: str | Path, ckpt_path: str | Path) -> None:
        """Write ``vqgan.yaml`` + ``vqgan.ckpt`` in Chameleon's layout (``{"state_dict": ...}``)."""
        if self.decoder is None:
            raise VQGANError("an encode-only VQGAN cannot be saved as an original (encoder + decoder) checkpoint")
        Path(yaml_path).parent.mkdir(parents=True, exist_ok=True)
        Path(ckpt_path).parent.mkdir(parents=True, exist_ok=True)
        Path(yaml_path).write_text(yaml.safe_dump(self.config.to_yaml_dict(), sort_keys=False))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        torch.save({"state_dict": state}, ckpt_path)


@torch.no_grad()
def fit_codebook(model: VQGAN, latents: torch.Tensor, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Set the codebook to k-means centroids of ``latents`` [N, embed_dim]; returns code usage [n_embed].

    For randomly initialised VQGANs (tests, the demo data set): a random codebook sits far from the
    encoder's outputs and maps every patch to a handful of codes. K-means centroids of real latents
    make every code the centre of a cluster of similar patches, so codes carry image content.
    """
    k = model.num_codes
    points = latents.detach().float().reshape(-1, latents.shape[-1])  # [N, D]
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.unique(points, dim=0)  # flat image regions repeat one latent many times
    if distinct.shape[0] >= k:
        centroids = distinct[torch.randperm(distinct.shape[0], generator=generator)[:k]].clone()
    else:  # fewer points than codes: jittered copies so no two codes coincide
        picks = torch.randint(points.shape[0], (k,), generator=generator)
        spread = points.std(dim=0, keepdim=True).clamp_min(1e-6)
        centroids = points[picks] + 0.01 * spread * torch.randn(k, points.shape[1], generator=generator)
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(dim=1)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]  # empty clusters keep their point
    model.quantize.embedding.weight.copy_(centroids.to(model.quantize.embedding.weight))
    return torch.bincount(torch.cdist(points, centroids).argmin(dim=1), minlength=k)


def hf_vq_state_dict(original_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``state_dict`` -> HF ``model.vqmodel.*`` names (decoder dropped), as HF's converter does."""
    return {
        f"{HF_VQ_PREFIX}{k}": v
        for k, v in original_state.items()
        if not k.startswith("decoder.") and not k.startswith(TRAINING_ONLY_PREFIXES)
    }


__all__ = [
    "VQGAN",
    "VQGANConfig",
    "VQGANError",
    "fit_codebook",
    "hf_vq_state_dict",
    "load_checkpoint_tensors",
]
