"""Frozen foundation encoders that give the image features of ARRA's alignment loss.

A small registry: each ``EncoderSpec`` names a loader ``kind`` and where its weights are, and each
loaded ``FeatureEncoder`` declares its own preprocessing (``preprocess``: PIL image -> [3, H, W]
tensor, picklable so DataLoader workers run it) whose resize / normalisation constants come from
the library's config (open_clip's ``preprocess_cfg``, the checkpoint's ``preprocessor_config.json``
for SAM and Hugging Face towers, timm's ``pretrained_cfg``), and encodes batches to fp16 global
features [B, D] (``encode``) and, for ``align.feature=patch``, patch features [B, P, D]
(``encode_patches``, from the whole picture resized to the encoder's input: ``patch_preprocess``).

Kinds and aggregations of the global feature (paper sec. 3 and Table 4); patches are always the
per-patch tokens through the same projection / head as the global feature:
    open_clip  BiomedCLIP, CLIP. cls = the pooled [CLS] embedding after the projection (what
               ``encode_image`` / HF ``get_image_features`` return, unnormalised); avgpool = the mean
               of the patch tokens through the same projection; concat = [cls, avgpool] (2D wide).
    sam        MedSAM, SAM (transformers ``SamModel`` vision encoder). avgpool = mean over the
               neck's [B, 256, 64, 64] output (the reference's AdaptiveAvgPool2d); SAM has no [CLS].
               Patches: the neck's 64 x 64 grid.
    hf         a transformers ``AutoModel`` vision tower (DINOv2, DINOv2 with registers, SigLIP; the
               vision tower of a dual model). cls = ``pooler_output``: DINOv2's [CLS] after the final
               layernorm, SigLIP's attention-pool head; patches = ``last_hidden_state`` without the
               [CLS] / register tokens (DINOv2: ``last_hidden_state[:, 1 + registers:]``, as REPA's
               ``x_norm_patchtokens``); avgpool = their mean.
    timm       a timm model saved with ``timm.models.save_for_hf`` (config.json + weights). cls = the
               model's own pooling (``forward_head(forward_features(x), pre_logits=True)``: the [CLS]
               token of a ViT, average pooling of a CNN); patches = ``forward_features`` without the
               prefix tokens; avgpool = their mean.

Every encoder is frozen and in eval mode once loaded (``load_encoder``): an encoder left in train
mode (dropout, batch statistics) silently changes the targets (sihyun-yu/REPA issue 45: MAE and
I-JEPA were loaded in train mode).

Weights come from a local path (``EncoderSpec.path``) or the library's own Hugging Face cache; this
module never downloads. ``build_tiny_open_clip_dir`` / ``build_tiny_sam_dir`` write small random
encoders in the same on-disk formats for tests and the demo data set.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from arra_ds.data.schema import feature_column
from arra_ds.errors import ConfigError, UserError

Aggregation = Literal["cls", "avgpool", "concat"]
AGGREGATIONS: tuple[str, ...] = ("cls", "avgpool", "concat")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir / HF-hub layout
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_HF_PREFIX = "hf-hub:"


class EncoderError(UserError, ValueError):
    """An encoder that cannot be built: the message names the encoder, the path and the fix."""


@dataclass
class EncoderSpec:
    """Which encoder, where its weights are, and how its tokens become one global feature."""

    name: str  # MDS column feat_<name> (and patch_<name> with patch features)
    kind: Literal["open_clip", "sam", "hf", "timm"]
    model: str = ""  # open_clip: built-in arch ("ViT-L-14") or "hf-hub:org/repo"; sam / hf: HF repo id (local cache)
    pretrained: str = ""  # open_clip tag of a built-in arch ("openai"), looked up in the HF cache
    # local dir (open_clip_config.json + weights; a HF SAM / AutoModel dir; a timm save_for_hf dir) or an
    # open_clip weights file
    path: str = ""
    aggregation: Aggregation = "cls"

    @property
    def column(self) -> str:
        return feature_column(self.name)

    def validate(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"encoder name {self.name!r} must be a plain name (letters, digits, _): it names feat_<name>")
        if self.kind not in LOADERS:
            raise ConfigError(f"encoder {self.name}: kind={self.kind!r} is not one of {sorted(LOADERS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"encoder {self.name}: aggregation={self.aggregation!r}; use one of {list(AGGREGATIONS)}")
        if self.kind == "sam" and self.aggregation != "avgpool":
            raise ConfigError(
                f"encoder {self.name}: SAM has no [CLS] token, so aggregation must be avgpool (got {self.aggregation})"
            )
        if self.kind == "timm" and not self.path:
            raise ConfigError(
                f"encoder {self.name}: a timm encoder loads from a local directory written by timm's save_for_hf "
                f"(config.json + model.safetensors); pass {self.name}=/path/to/that/dir"
            )
        if not (self.path or self.model):
            raise ConfigError(f"encoder {self.name}: set a local path (name=/path/to/weights) or a model id")


PRESETS: dict[str, EncoderSpec] = {
    # BiomedCLIP's open_clip release (open_clip_config.json + open_clip_pytorch_model.bin), 512-d.
    "biomedclip": EncoderSpec(
        "biomedclip", "open_clip", model="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    ),
    "clip": EncoderSpec("clip", "open_clip", model="ViT-L-14", pretrained="openai"),  # CLIP-L, 768-d
    # CLIP ViT-B/16, 512-d: the width of ARRA-Base's CLIP target (paper appendix 6)
    "clip_b16": EncoderSpec("clip_b16", "open_clip", model="ViT-B-16", pretrained="openai"),
    "medsam": EncoderSpec("medsam", "sam", model="flaviagiammarino/medsam-vit-base", aggregation="avgpool"),  # 256-d
    "sam": EncoderSpec("sam", "sam", model="facebook/sam-vit-base", aggregation="avgpool"),  # 256-d
    # REPA's and Mirai's target encoder, 768-d; 16 x 16 patches at its 224-px crop
    "dinov2": EncoderSpec("dinov2", "hf", model="facebook/dinov2-base"),
    "siglip": EncoderSpec("siglip", "hf", model="google/siglip-base-patch16-224"),  # 768-d, 14 x 14 patches
    # any local transformers vision tower / timm model: dinov2=/models/x works too; these name the column by kind
    "hf": EncoderSpec("hf", "hf"),
    "timm": EncoderSpec("timm", "timm"),
}


def parse_encoder_arg(text: str) -> EncoderSpec:
    """``preset[:aggregation][=path]`` -> EncoderSpec (CLI syntax of launch/pretokenize.py).

    A non-default aggregation gets its own column, e.g. ``biomedclip:avgpool`` -> feat_biomedclip_avgpool,
    so one data set can carry the Table 4 variants side by side.
    """
    head, _, path = text.partition("=")
    preset_name, _, aggregation = head.partition(":")
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown encoder {preset_name!r} in {text!r}; known: {sorted(PRESETS)}")
    spec = replace(PRESETS[preset_name], path=path.strip())
    if aggregation and aggregation != spec.aggregation:
        spec = replace(spec, aggregation=aggregation, name=f"{spec.name}_{aggregation}")
    spec.validate()
    return spec


# ------------------------------------------------------------------------------------------------
# Loaded encoders
# ------------------------------------------------------------------------------------------------


class FeatureEncoder(nn.Module, abc.ABC):
    """Base: ``preprocess`` (PIL -> tensor) + batched ``encode`` (pixels [B, 3, H, W] -> fp16 [B, D]);
    ``patch_preprocess`` + ``encode_patches`` (-> fp16 [B, P, D]) for patch features."""

    def __init__(self, spec: EncoderSpec, preprocess: Callable[[Image.Image], torch.Tensor], dim: int,
                 patch_preprocess: Callable[[Image.Image], torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.dim = dim
        # The whole picture at the encoder's input size, no crop: a patch feature must lie where the VQ
        # codes of the same picture lie (the encoder's own centre crop would shift and cut the grid).
        self.patch_preprocess = patch_preprocess

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> global features [B, D] (model dtype)."""

    @abc.abstractmethod
    def patch_grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> patch features [B, gh, gw, D] (model dtype), through the global feature's
        projection where the encoder has one."""

    def _weight(self) -> torch.Tensor:
        return next(self.parameters())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels from ``preprocess`` stacked [B, 3, H, W] -> fp16 features [B, D] on the CPU."""
        weight = self._weight()
        out = self.features(pixels.to(device=weight.device, dtype=weight.dtype))
        return out.float().to(torch.float16).cpu()

    @torch.no_grad()
    def encode_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels from ``patch_preprocess`` stacked [B, 3, H, W] -> fp16 patch features [B, g * g, D] on the
        CPU, raster order over the square g x g patch grid (the data column patch_<name>)."""
        weight = self._weight()
        grid = self.patch_grid_features(pixels.to(device=weight.device, dtype=weight.dtype))  # [B, gh, gw, D]
        if grid.shape[1] != grid.shape[2]:
            raise EncoderError(
                f"encoder {self.name}: patch features need a square patch grid, got {grid.shape[1]} x {grid.shape[2]} "
                "(the encoder's input size is not square)"
            )
        return grid.flatten(1, 2).float().to(torch.float16).cpu()


class OpenClipImageEncoder(FeatureEncoder):
    """The image tower of an open_clip model (native ViT or timm trunk)."""

    def __init__(self, spec: EncoderSpec, visual: nn.Module, preprocess, embed_dim: int, patch_preprocess):
        width = 2 * embed_dim if spec.aggregation == "concat" else embed_dim
        super().__init__(spec, preprocess, width, patch_preprocess)
        self.visual = visual.eval()

    def patch_grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        if hasattr(visual, "trunk"):  # TimmModel: prefix tokens dropped, the head (projection) per token
            tokens = visual.trunk.forward_features(pixels)[:, visual.trunk.num_prefix_tokens :]  # [B, N, C]
            grid_h, grid_w = visual.trunk.patch_embed.grid_size
            patches = visual.head(tokens)
        else:
            visual.output_tokens = True
            _, patches = visual(pixels)  # [B, N, width], after ln_post
            grid_h, grid_w = visual.grid_size
            if visual.proj is not None:
                patches = patches @ visual.proj
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1])

    def _pooled_and_patch_mean(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS] embedding [B, D], mean patch token through the same projection [B, D])."""
        visual = self.visual
        if hasattr(visual, "trunk"):  # open_clip TimmModel (BiomedCLIP): trunk -> head(proj)
            tokens = visual.trunk.forward_features(pixels)  # [B, prefix + N, C], after the final norm
            pooled = visual.head(visual.trunk.forward_head(tokens))
            patch_mean = visual.head(tokens[:, visual.trunk.num_prefix_tokens :].mean(dim=1))
            return pooled, patch_mean
        visual.output_tokens = True  # native VisionTransformer: (projected pooled, ln_post'ed patch tokens)
        pooled, tokens = visual(pixels)
        patch_mean = tokens.mean(dim=1)
        if visual.proj is not None:
            patch_mean = patch_mean @ visual.proj
        return pooled, patch_mean

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled, patch_mean = self._pooled_and_patch_mean(pixels)
        if self.spec.aggregation == "cls":
            return pooled
        if self.spec.aggregation == "avgpool":
            return patch_mean
        return torch.cat([pooled, patch_mean], dim=-1)


class SamImageEncoder(FeatureEncoder):
    """transformers ``SamModel.vision_encoder``; global feature = mean over the neck's spatial grid."""

    def __init__(self, spec: EncoderSpec, vision_encoder: nn.Module, preprocess, channels: int, patch_preprocess):
        super().__init__(spec, preprocess, channels, patch_preprocess)
        self.vision_encoder = vision_encoder.eval()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.vision_encoder(pixel_values=pixels).last_hidden_state  # [B, C, h, w]
        return grid.mean(dim=(2, 3))

    def patch_grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(pixel_values=pixels).last_hidden_state.permute(0, 2, 3, 1)  # [B, h, w, C]


def _pool_tokens(spec: EncoderSpec, pooled: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
    """The global feature of ``spec.aggregation`` from a pooled embedding [B, D] and patch tokens [B, N, D]."""
    patch_mean = patches.mean(dim=1)
    if spec.aggregation == "avgpool":
        return patch_mean
    if pooled is None:
        raise EncoderError(f"encoder {spec.name}: this model has no pooled output; use aggregation avgpool")
    return pooled if spec.aggregation == "cls" else torch.cat([pooled, patch_mean], dim=-1)


class HFVisionEncoder(FeatureEncoder):
    """A transformers vision tower (``AutoModel``): DINOv2 (with registers), SigLIP, ..."""

    def __init__(self, spec: EncoderSpec, tower: nn.Module, preprocess, hidden: int, patch_size: int, patch_preprocess):
        super().__init__(spec, preprocess, 2 * hidden if spec.aggregation == "concat" else hidden, patch_preprocess)
        self.tower = tower.eval()
        self.patch_size = patch_size

    def _run(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, int]]:
        """(pooler_output [B, D] or None, patch tokens [B, gh * gw, D], (gh, gw))."""
        out = self.tower(pixel_values=pixels)
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        tokens = out.last_hidden_state  # [B, prefix + gh * gw, D]; DINOv2: after its final layernorm
        patches = tokens[:, tokens.shape[1] - grid[0] * grid[1] :]  # DINOv2: [CLS] and registers come first
        return getattr(out, "pooler_output", None), patches, grid

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled, patches, _ = self._run(pixels)
        return _pool_tokens(self.spec, pooled, patches)

    def patch_grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        _, patches, (grid_h, grid_w) = self._run(pixels)
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1])


class TimmEncoder(FeatureEncoder):
    """A timm model: ``forward_features`` tokens (ViT) or feature map (CNN); its own pooling for cls."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, preprocess, patch_preprocess):
        width = model.num_features
        super().__init__(spec, preprocess, 2 * width if spec.aggregation == "concat" else width, patch_preprocess)
        self.model = model.eval()

    def _patch_grid(self, features: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """forward_features output -> [B, gh, gw, D]."""
        if features.dim() == 4:  # a CNN's NCHW feature map
            return features.permute(0, 2, 3, 1)
        patch_h, patch_w = self.model.patch_embed.patch_size
        grid_h, grid_w = pixels.shape[-2] // patch_h, pixels.shape[-1] // patch_w
        patches = features[:, getattr(self.model, "num_prefix_tokens", 0) :]
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1])

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixels)
        pooled = self.model.forward_head(features, pre_logits=True)
        return _pool_tokens(self.spec, pooled, self._patch_grid(features, pixels).flatten(1, 2))

    def patch_grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._patch_grid(self.model.forward_features(pixels), pixels)


# ------------------------------------------------------------------------------------------------
# Preprocessing (picklable callables; constants from the encoders' own configs)
# ------------------------------------------------------------------------------------------------


class OpenClipPreprocess:
    """open_clip's eval transform (resize, centre crop, normalise) built from its preprocess_cfg."""

    def __init__(self, preprocess_cfg: dict):
        # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.preprocess_cfg = dict(preprocess_cfg)
        self.transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))


class ResizeNormalize:
    """PIL -> [3, H, W]: the whole picture resized to the encoder's input size (no crop), scaled to [0, 1]
    and normalised with the encoder's own mean / std (the input of patch features)."""

    def __init__(self, size: tuple[int, int], mean, std, resample: int = Image.Resampling.BICUBIC):
        self.size = (int(size[0]), int(size[1]))  # (H, W)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.resample = resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        height, width = self.size
        resized = image.convert("RGB").resize((width, height), resample=self.resample)
        array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, H, W]
        # numpy, not torch: torch would spin up its intra-op threads for each small image (DataLoader workers)
        return torch.from_numpy(np.ascontiguousarray((array - self.mean) / self.std))


def _pil_resample(name: str) -> int:
    """open_clip / timm interpolation names -> PIL's resampling filter."""
    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}.get(name, Image.Resampling.BICUBIC)  # fmt: skip


def _size_pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def open_clip_patch_preprocess(preprocess_cfg: dict) -> ResizeNormalize:
    return ResizeNormalize(_size_pair(preprocess_cfg["size"]), preprocess_cfg["mean"], preprocess_cfg["std"],
                           _pil_resample(str(preprocess_cfg.get("interpolation", "bicubic"))))  # fmt: skip


def hf_patch_preprocess(processor) -> ResizeNormalize:
    """The input size of a transformers image processor (its crop, its padded square for SAM, or its
    resize target) with its mean / std: what the model sees, without the crop."""
    size = getattr(processor, "size", None) or {}
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        hw = (processor.crop_size["height"], processor.crop_size["width"])
    elif getattr(processor, "do_pad", False) and getattr(processor, "pad_size", None):
        hw = (processor.pad_size["height"], processor.pad_size["width"])
    elif "height" in size:
        hw = (size["height"], size["width"])
    else:
        side = size.get("shortest_edge") or size.get("longest_edge")
        hw = (side, side)
    return ResizeNormalize(hw, processor.image_mean, processor.image_std, processor.resample)


class HFImagePreprocess:
    """A transformers image processor from the checkpoint's preprocessor_config.json: SAM's longest side
    resize, rescale, normalise, pad; DINOv2's resize + centre crop; SigLIP's resize."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def _hf_cached_file(repo_id: str, filename: str) -> str | None:
    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def _resolve_open_clip(spec: EncoderSpec) -> tuple[dict, dict, str]:
    """(model_cfg, preprocess_cfg, weights file) from a local dir/file or open_clip's HF cache."""
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    defaults = asdict(PreprocessCfg())
    path = Path(spec.path) if spec.path else None
    if path is not None and path.is_dir():
        config_file = path / OPEN_CLIP_CONFIG
        weights = next((path / w for w in OPEN_CLIP_WEIGHTS if (path / w).is_file()), None)
        if not config_file.is_file() or weights is None:
            raise EncoderError(
                f"encoder {spec.name}: {path} must hold {OPEN_CLIP_CONFIG} and one of {OPEN_CLIP_WEIGHTS} "
                "(the layout of open_clip's Hugging Face releases, e.g. BiomedCLIP)"
            )
        config = json.loads(config_file.read_text())
        return config["model_cfg"], merge_preprocess_dict(defaults, config.get("preprocess_cfg", {})), str(weights)
    if spec.model.startswith(OPEN_CLIP_HF_PREFIX):
        repo = spec.model[len(OPEN_CLIP_HF_PREFIX) :]
        config_file = _hf_cached_file(repo, OPEN_CLIP_CONFIG)
        weights = next((w for w in (_hf_cached_file(repo, n) for n in OPEN_CLIP_WEIGHTS) if w), None)
        if config_file is None or weights is None:
            raise EncoderError(
                f"encoder {spec.name}: {repo} is not in the local Hugging Face cache. Download it once "
                f"(huggingface-cli download {repo}) and pass {spec.name}=/path/to/that/dir; nothing is downloaded here"
            )
        config = json.loads(Path(config_file).read_text())
        return config["model_cfg"], merge_preprocess_dict(defaults, config.get("preprocess_cfg", {})), weights
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        raise EncoderError(f"encoder {spec.name}: {spec.model!r} is not an open_clip architecture")
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) if spec.pretrained else {}
    model_cfg = dict(model_cfg)
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True  # e.g. OpenAI CLIP weights were trained with QuickGELU
    preprocess = merge_preprocess_dict(defaults, tag_cfg)
    preprocess["size"] = model_cfg["vision_cfg"].get("image_size", preprocess["size"])
    if path is not None:
        if not path.is_file():
            raise EncoderError(f"encoder {spec.name}: weights {path} not found")
        return model_cfg, preprocess, str(path)
    hub = tag_cfg.get("hf_hub", "")
    repo_id, filename = hub.rsplit("/", 1) if hub else ("", "")
    names = [filename] if filename else list(OPEN_CLIP_WEIGHTS)
    weights = next((w for w in (_hf_cached_file(repo_id, n) for n in names) if w), None) if repo_id else None
    if weights is None:
        raise EncoderError(
            f"encoder {spec.name}: weights of {spec.model}/{spec.pretrained} are not in the local Hugging Face cache "
            f"({repo_id or 'no hf_hub entry'}); pass {spec.name}=/path/to/open_clip_pytorch_model.bin"
        )
    return model_cfg, preprocess, weights


def feature_width(spec: EncoderSpec) -> int | None:
    """The width D of ``feat_<name>`` read from the encoder's config alone (no weights are loaded);
    None where the config is not on this machine."""
    if spec.kind == "sam":
        # transformers' SAM config: imported only where a SAM encoder's width is asked for
        from transformers import SamConfig

        try:
            return int(SamConfig.from_pretrained(spec.path or spec.model, local_files_only=True).vision_config.output_channels)
        except (OSError, ValueError):
            return None
    path = Path(spec.path) if spec.path else None
    if path is not None and path.is_dir():
        config_file = path / OPEN_CLIP_CONFIG
        model_cfg = json.loads(config_file.read_text())["model_cfg"] if config_file.is_file() else None
    elif spec.model.startswith(OPEN_CLIP_HF_PREFIX):
        cached = _hf_cached_file(spec.model[len(OPEN_CLIP_HF_PREFIX) :], OPEN_CLIP_CONFIG)
        model_cfg = json.loads(Path(cached).read_text())["model_cfg"] if cached else None
    else:
        # open_clip (and timm behind it) costs seconds to import: only for a built-in open_clip architecture
        import open_clip

        model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        return None
    width = int(model_cfg["embed_dim"])
    return 2 * width if spec.aggregation == "concat" else width


def load_open_clip_encoder(spec: EncoderSpec) -> OpenClipImageEncoder:
    """Build only the image tower (no text tower, which for BiomedCLIP would need PubMedBERT's config)."""
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    from open_clip.factory import load_state_dict
    from open_clip.model import _build_vision_tower

    model_cfg, preprocess_cfg, weights = _resolve_open_clip(spec)
    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # weights come from the checkpoint below, never from timm's hub
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    state = load_state_dict(weights, weights_only=True)
    visual_state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual_state:
        raise EncoderError(f"encoder {spec.name}: {weights} has no 'visual.*' tensors; is it an open_clip checkpoint?")
    try:
        visual.load_state_dict(visual_state, strict=True)
    except RuntimeError as e:
        raise EncoderError(f"encoder {spec.name}: {weights} does not fit the config's image tower: {e}") from e
    return OpenClipImageEncoder(
        spec, visual, OpenClipPreprocess(preprocess_cfg), int(model_cfg["embed_dim"]), open_clip_patch_preprocess(preprocess_cfg)
    )


def local_hf_source(spec: EncoderSpec, what: str) -> str:
    """Where a Hugging Face encoder loads from: its local directory, else its repo id in the library's own cache."""
    if spec.path and not Path(spec.path).is_dir():
        raise EncoderError(
            f"encoder {spec.name}: {spec.path} is not a directory; point it at a local copy of a Hugging Face {what} "
            "(config.json, weights, preprocessor_config.json)"
        )
    return spec.path or spec.model


def load_sam_encoder(spec: EncoderSpec) -> SamImageEncoder:
    # transformers' SAM pulls in its image processors: imported only where a SAM encoder is built
    from transformers import SamImageProcessor, SamModel

    source = local_hf_source(spec, "SAM checkpoint")
    try:
        model = SamModel.from_pretrained(source, local_files_only=True)
        processor = SamImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EncoderError(
            f"encoder {spec.name}: cannot load a SamModel + SamImageProcessor from {source} without downloading "
            f"({e}). Pass {spec.name}=/path/to/a/local/copy of {spec.model or 'the checkpoint'}"
        ) from e
    return SamImageEncoder(
        spec, model.vision_encoder, HFImagePreprocess(processor), model.config.vision_config.output_channels,
        hf_patch_preprocess(processor),
    )


def load_hf_encoder(spec: EncoderSpec) -> HFVisionEncoder:
    """A transformers ``AutoModel`` vision tower + ``AutoImageProcessor`` from a local dir (or the local HF cache)."""
    # transformers' auto classes import the model code on demand: only where such an encoder is built
    from transformers import MODEL_MAPPING, AutoConfig, AutoImageProcessor

    source = local_hf_source(spec, "vision model, e.g. facebook/dinov2-base")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        # AutoModel's class, loaded through the class itself: with peft installed AutoModel.from_pretrained looks
        # for an adapter_config.json online even under local_files_only (half a minute of retries offline)
        model = MODEL_MAPPING[type(config)].from_pretrained(source, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=True, use_fast=False)
    except (OSError, ValueError, KeyError) as e:
        raise EncoderError(
            f"encoder {spec.name}: cannot load an AutoModel + AutoImageProcessor from {source} without downloading "
            f"({e}). Pass {spec.name}=/path/to/a/local/copy of {spec.model or 'the checkpoint'}"
        ) from e
    # a dual image-text model (SiglipModel, CLIPModel): its vision tower only
    tower = model.vision_model if hasattr(model, "text_model") else model
    config = tower.config
    return HFVisionEncoder(spec, tower, HFImagePreprocess(processor), int(config.hidden_size), int(config.patch_size),
                           hf_patch_preprocess(processor))  # fmt: skip


def load_timm_encoder(spec: EncoderSpec) -> TimmEncoder:
    """A timm model from a local ``save_for_hf`` directory (config.json with ``architecture``, ``model_args``,
    ``pretrained_cfg``; model.safetensors or pytorch_model.bin), loaded strictly; eval transform from its
    pretrained_cfg."""
    # timm costs seconds to import: only where a timm encoder is built
    import timm
    from timm.data import create_transform, resolve_model_data_config

    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise EncoderError(
            f"encoder {spec.name}: {path} must be a directory with config.json and model weights written by "
            "timm.models.save_for_hf (the layout of timm's Hugging Face releases)"
        )
    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise EncoderError(f"encoder {spec.name}: cannot build the timm model in {path}: {e}") from e
    data_cfg = resolve_model_data_config(model)
    patch_preprocess = ResizeNormalize(data_cfg["input_size"][1:], data_cfg["mean"], data_cfg["std"],
                                       _pil_resample(str(data_cfg.get("interpolation", "bicubic"))))  # fmt: skip
    return TimmEncoder(spec, model, create_transform(**data_cfg, is_training=False), patch_preprocess)


LOADERS: dict[str, Callable[[EncoderSpec], FeatureEncoder]] = {
    "open_clip": load_open_clip_encoder,
    "sam": load_sam_encoder,
    "hf": load_hf_encoder,
    "timm": load_timm_encoder,
}


def freeze_encoder(encoder: nn.Module) -> nn.Module:
    """Eval mode and no gradients, every submodule and parameter (REPA issue 45: an encoder left in train mode)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def load_encoder(spec: EncoderSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FeatureEncoder:
    spec.validate()
    encoder = LOADERS[spec.kind](spec)
    return freeze_encoder(encoder.to(device=device, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# Tiny random encoders in the real on-disk formats (tests, demo data)
# ------------------------------------------------------------------------------------------------


def build_tiny_open_clip_dir(out_dir: str | Path, seed: int = 0, image_size: int = 32, embed_dim: int = 32,
                             width: int = 32, layers: int = 2, patch_size: int = 8, timm_model_name: str = "",
                             text_context_length: int = 8, text_vocab_size: int = 64) -> Path:
    """A random open_clip CLIP saved as open_clip_config.json + safetensors (open_clip's HF layout).

    The image tower is open_clip's own ViT, or with ``timm_model_name`` a timm trunk + linear
    projection as in BiomedCLIP's config (timm_pool "", timm_proj "linear"). The text tower is tiny;
    for ``encode_text`` with open_clip's tokenizer (CLIP-Score) give it the tokenizer's vocabulary
    size. The image tower is built first, so the text settings do not change its weights.
    """
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if timm_model_name:
        vision_cfg = {"timm_model_name": timm_model_name, "timm_model_pretrained": False, "timm_pool": "",
                      "timm_proj": "linear", "image_size": image_size}
    else:
        vision_cfg = {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size, "head_width": 16}
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": text_context_length, "vocab_size": text_vocab_size, "width": 32, "heads": 2,
                     "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    preprocess_cfg = {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / OPEN_CLIP_WEIGHTS[0]))
    return out_dir


def build_tiny_sam_dir(out_dir: str | Path, seed: int = 0, image_size: int = 64, channels: int = 16) -> Path:
    """A random transformers SamModel + SamImageProcessor (longest side and padding = image_size)."""
    # transformers' SAM pulls in its image processors: imported only where a SAM encoder is built
    from transformers import SamConfig, SamImageProcessor, SamModel, SamVisionConfig

    out_dir = Path(out_dir)
    vision = SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=image_size, patch_size=16,
        output_channels=channels, window_size=2, global_attn_indexes=[1], num_pos_feats=8,
    )
    torch.manual_seed(seed)
    SamModel(SamConfig(vision_config=vision.to_dict())).save_pretrained(out_dir)
    SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir
