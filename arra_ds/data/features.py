"""Frozen foundation encoders that give the global image feature f_GF of ARRA's alignment loss.

A small registry: each ``EncoderSpec`` names a loader ``kind`` and where its weights are, and each
loaded ``FeatureEncoder`` declares its own preprocessing (``preprocess``: PIL image -> [3, H, W]
tensor, picklable so DataLoader workers run it) whose resize / normalisation constants come from
the library's config (open_clip's ``preprocess_cfg``, the checkpoint's ``preprocessor_config.json``
for SAM), and encodes batches to fp16 features [B, D].

Kinds and aggregations (paper sec. 3 and Table 4):
    open_clip  BiomedCLIP, CLIP. cls = the pooled [CLS] embedding after the projection (what
               ``encode_image`` / HF ``get_image_features`` return, unnormalised); avgpool = the mean
               of the patch tokens through the same projection; concat = [cls, avgpool] (2D wide).
    sam        MedSAM, SAM (transformers ``SamModel`` vision encoder). avgpool = mean over the
               neck's [B, 256, 64, 64] output (the reference's AdaptiveAvgPool2d); SAM has no [CLS].

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

    name: str  # MDS column feat_<name>
    kind: Literal["open_clip", "sam"]
    model: str = ""  # open_clip: built-in arch ("ViT-L-14") or "hf-hub:org/repo"; sam: HF repo id
    pretrained: str = ""  # open_clip tag of a built-in arch ("openai"), looked up in the HF cache
    path: str = ""  # local dir (open_clip_config.json + weights, or a HF SAM dir) or open_clip weights file
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
    """Base: ``preprocess`` (PIL -> tensor) + batched ``encode`` (pixels [B, 3, H, W] -> fp16 [B, D])."""

    def __init__(self, spec: EncoderSpec, preprocess: Callable[[Image.Image], torch.Tensor], dim: int):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.dim = dim

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> global features [B, D] (model dtype)."""

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels from ``preprocess`` stacked [B, 3, H, W] -> fp16 features [B, D] on the CPU."""
        weight = next(self.parameters())
        out = self.features(pixels.to(device=weight.device, dtype=weight.dtype))
        return out.float().to(torch.float16).cpu()


class OpenClipImageEncoder(FeatureEncoder):
    """The image tower of an open_clip model (native ViT or timm trunk)."""

    def __init__(self, spec: EncoderSpec, visual: nn.Module, preprocess, embed_dim: int):
        width = 2 * embed_dim if spec.aggregation == "concat" else embed_dim
        super().__init__(spec, preprocess, width)
        self.visual = visual.eval()

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

    def __init__(self, spec: EncoderSpec, vision_encoder: nn.Module, preprocess, channels: int):
        super().__init__(spec, preprocess, channels)
        self.vision_encoder = vision_encoder.eval()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.vision_encoder(pixel_values=pixels).last_hidden_state  # [B, C, h, w]
        return grid.mean(dim=(2, 3))


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


class SamPreprocess:
    """SamImageProcessor (longest side resize, rescale, normalise, pad) from preprocessor_config.json."""

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
    return OpenClipImageEncoder(spec, visual, OpenClipPreprocess(preprocess_cfg), int(model_cfg["embed_dim"]))


def load_sam_encoder(spec: EncoderSpec) -> SamImageEncoder:
    # transformers' SAM pulls in its image processors: imported only where a SAM encoder is built
    from transformers import SamImageProcessor, SamModel

    if spec.path and not Path(spec.path).is_dir():
        raise EncoderError(
            f"encoder {spec.name}: {spec.path} is not a directory; point it at a local copy of a Hugging Face SAM "
            "checkpoint (config.json, weights, preprocessor_config.json)"
        )
    source = spec.path or spec.model
    try:
        model = SamModel.from_pretrained(source, local_files_only=True)
        processor = SamImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EncoderError(
            f"encoder {spec.name}: cannot load a SamModel + SamImageProcessor from {source} without downloading "
            f"({e}). Pass {spec.name}=/path/to/a/local/copy of {spec.model or 'the checkpoint'}"
        ) from e
    return SamImageEncoder(spec, model.vision_encoder, SamPreprocess(processor), model.config.vision_config.output_channels)


LOADERS: dict[str, Callable[[EncoderSpec], FeatureEncoder]] = {
    "open_clip": load_open_clip_encoder,
    "sam": load_sam_encoder,
}


def load_encoder(spec: EncoderSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FeatureEncoder:
    spec.validate()
    encoder = LOADERS[spec.kind](spec)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.to(device=device, dtype=dtype).eval()


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
