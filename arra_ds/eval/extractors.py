"""Feature extractors for FID: ``inception`` (2048-d pool3), ``xrv`` (1024-d, chest X-rays),
``thumbnail`` (192-d, parameter-free, for the built-in demo scenes) and ``scene`` (the demo scenes'
attribute model, ``arra_ds.demo.attributes``, trained by the study).

All take uint8 RGB batches [B, 3, H, W] (what a PNG holds) and return float64 features [B, D].
All use local weights only; nothing is downloaded:

- ``weights=""``: the library's own cache (where pytorch-fid / torchxrayvision would have put the
  file), e.g. ``~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`` and
  ``~/.torchxrayvision/models_data/nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``;
- ``weights=<path>``: that file;
- ``weights="random"``: randomly initialised from a fixed seed, for pipeline tests (the metric
  values are then meaningless, and the weights hash says which weights were used).

``weights_hash`` is the SHA-256 of the network's state dict (names, dtypes, shapes, values); it goes
into every statistics file and report so FIDs made with different weights are never compared.

``thumbnail`` has no weights: the features of an image are its 8 x 8 thumbnail (area average, RGB in
[0, 1]). On the demo's flat coloured shapes colour and layout are the whole content, and at 128 px a
thumbnail cell is one 16-px VQ patch, so its Frechet distance compares what the demo captions
describe, offline. It is a demo-domain metric, not comparable with Inception FIDs.

Preprocessing (the resize method changes FID, so it is fixed and documented here):
- inception: /255 -> [0, 1]; the network resizes to 299 (bilinear, no antialias, as pytorch-fid).
- xrv: grayscale as the mean of R, G, B (torchxrayvision's README), scaled to [-1024, 1024] with
  ``(2 x / 255 - 1) * 1024`` (``xrv.utils.normalize(img, 255)``), centre crop to the short side
  (``XRayCenterCrop``), resize to 224 (bilinear with antialiasing, the resize torchxrayvision's own
  ``fix_resolution`` applies), then ``features2`` (ReLU + global average pool of the DenseNet
  features, 1024-d).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from arra_ds.demo.attributes import AttributeNetConfig, SceneAttributeNet, SceneFeatures, load_attribute_net
from arra_ds.errors import ConfigError, MissingDependencyError, UserError
from arra_ds.eval.inception import FID_INCEPTION_FILENAME, POOL3_DIM, FIDInceptionV3
from arra_ds.weights import load_strict

RANDOM_WEIGHTS = "random"
RANDOM_WEIGHTS_SEED = 0
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_INPUT_SIZE = 224
XRV_PIXEL_RANGE = 1024.0  # torchxrayvision's inputs span [-1024, 1024]
XRV_FEATURE_DIM = 1024


class ExtractorWeightsError(UserError, ValueError):
    """A weights file that does not hold this extractor's network; the message names the file."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    pass


def state_dict_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        shape = tensor.shape
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_state_dict_file(path: Path) -> dict:
    """A state dict from ``path``: a plain state dict, or (torchxrayvision's format) a pickled module."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # torchxrayvision ships whole pickled modules; unpickling runs code, so it is only done for
        # the weights file the user named (or the library's cache) after the safe loader refused it.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if not isinstance(obj, dict):
        raise ExtractorWeightsError(f"{path} holds a {type(obj).__name__}, expected a state dict or a module")
    return obj


def _load_strict(module: nn.Module, state: dict, path: Path, ignore_missing: tuple[str, ...] = ()) -> None:
    load_strict(module, state, source=f"weights file {path}", what=f"the {type(module).__name__} layout",
                error=ExtractorWeightsError, optional_suffixes=ignore_missing)


@dataclass
class FeatureExtractor:
    """A frozen network plus its preprocessing; ``extract(uint8 [B,3,H,W]) -> float64 [B, D]``."""

    name: str
    network: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B,3,H,W] -> network input (float)
    feature_dim: int
    weights: str  # the file used, or "random"
    weights_hash: str

    def to(self, device: torch.device | str) -> "FeatureExtractor":
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter([*self.network.parameters(), *self.network.buffers()])).device

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"extractor '{self.name}' expects uint8 RGB [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        inputs = self.preprocess(images.to(self.device))
        return self.network(inputs).double().cpu()

    def describe(self) -> dict:
        return {"feature_dim": self.feature_dim, "weights": self.weights, "weights_hash": self.weights_hash}


# ---- inception ----------------------------------------------------------------------------------
def inception_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_FILENAME


def _inception_preprocess(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def build_inception(weights: str = "") -> FeatureExtractor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        network = FIDInceptionV3()
    if weights == RANDOM_WEIGHTS:
        source = RANDOM_WEIGHTS
    else:
        path = Path(weights) if weights else inception_cache_path()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"FID Inception weights not found at {path}. Nothing is downloaded at run time: fetch "
                f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_INCEPTION_FILENAME} "
                "to that path (pytorch-fid's and torchmetrics' cache location) or pass its path as the inception weights"
            )
        _load_strict(network, _load_state_dict_file(path), path, ignore_missing=("num_batches_tracked",))
        source = str(path)
    network.eval().requires_grad_(False)
    return FeatureExtractor("inception", network, _inception_preprocess, POOL3_DIM, source, state_dict_hash(network))


# ---- xrv ----------------------------------------------------------------------------------------
def _import_xrv():
    try:
        import torchxrayvision  # an optional dependency (the [eval] extra): imported only for the xrv extractor
    except ImportError as e:
        raise MissingDependencyError(
            "the 'xrv' FID extractor needs torchxrayvision, an optional dependency: pip install -e '.[eval]'"
        ) from e
    return torchxrayvision


def xrv_cache_path() -> Path:
    xrv = _import_xrv()

    url = xrv.models.model_urls[XRV_WEIGHTS_NAME]["weights_url"]
    return Path(os.path.expanduser(xrv.utils.get_cache_dir())) / os.path.basename(url)


def xrv_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> [B, 1, 224, 224] in [-1024, 1024] (see the module docstring)."""
    gray = images.float().mean(dim=1, keepdim=True)  # [B, 1, H, W], 0..255
    scaled = (2.0 * gray / 255.0 - 1.0) * XRV_PIXEL_RANGE
    height, width = scaled.shape[-2:]
    side = min(height, width)
    top, left = height // 2 - side // 2, width // 2 - side // 2  # XRayCenterCrop's offsets
    cropped = scaled[..., top : top + side, left : left + side]
    if side == XRV_INPUT_SIZE:
        return cropped
    return F.interpolate(cropped, size=(XRV_INPUT_SIZE, XRV_INPUT_SIZE), mode="bilinear", antialias=True)


class XRVFeatures(nn.Module):
    """torchxrayvision's DenseNet-121 up to ``features2`` (ReLU + global average pool), 1024-d."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.densenet = densenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.densenet.features2(x)


def build_xrv(weights: str = "") -> FeatureExtractor:
    xrv = _import_xrv()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        # weights=None builds the same DenseNet-121 (1 input channel, 18 outputs) without touching
        # the network; the weights are loaded below from a local file.
        densenet = xrv.models.DenseNet(weights=None)
    if weights == RANDOM_WEIGHTS:
        source = RANDOM_WEIGHTS
    else:
        path = Path(weights) if weights else xrv_cache_path()
        if not path.is_file():
            url = xrv.models.model_urls[XRV_WEIGHTS_NAME]["weights_url"]
            raise WeightsNotFoundError(
                f"torchxrayvision {XRV_WEIGHTS_NAME} weights not found at {path}. Nothing is downloaded at run "
                f"time: fetch {url} to that path (torchxrayvision's cache) or pass its path as the xrv weights"
            )
        _load_strict(densenet, _load_state_dict_file(path), path)
        source = str(path)
    network = XRVFeatures(densenet).eval().requires_grad_(False)
    return FeatureExtractor("xrv", network, xrv_preprocess, XRV_FEATURE_DIM, source, state_dict_hash(network))


# ---- thumbnail ----------------------------------------------------------------------------------
THUMBNAIL_SIDE = 8


class ThumbnailFeatures(nn.Module):
    """[B, 3, H, W] in [0, 1] -> [B, 3 * side * side]: the area-averaged side x side thumbnail."""

    def __init__(self, side: int):
        super().__init__()
        # a buffer, not a constant: the side is part of the state dict, hence of the weights hash
        self.register_buffer("side", torch.tensor(side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = int(self.side)
        return F.adaptive_avg_pool2d(x, (side, side)).flatten(1)


def build_thumbnail(weights: str = "") -> FeatureExtractor:
    if weights not in ("", RANDOM_WEIGHTS):
        raise ConfigError(f"the thumbnail extractor has no weights (got {weights!r}); leave its weights empty")
    network = ThumbnailFeatures(THUMBNAIL_SIDE).eval()
    return FeatureExtractor(
        "thumbnail", network, _inception_preprocess, 3 * THUMBNAIL_SIDE**2, "none (parameter-free)", state_dict_hash(network)
    )



# ---- scene --------------------------------------------------------------------------------------
def build_scene(weights: str = "") -> FeatureExtractor:
    """The penultimate layer of the demo scenes' attribute model: ``weights`` is the file the study
    trained (``<study dir>/models/judge/attribute_net.safetensors``); it has no library cache.
    Input: the mean colour of each code patch (the picture as the demo VQ tokenizer sees it)."""
    if weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net = SceneAttributeNet(AttributeNetConfig())
        source = RANDOM_WEIGHTS
    elif not weights:
        raise WeightsNotFoundError(
            "the 'scene' extractor has no default weights: pass extractor_weights={scene: <study dir>/models/judge/"
            "attribute_net.safetensors} (trained by launch/study.py)"
        )
    else:
        net = load_attribute_net(weights)
        source = str(weights)
    network = SceneFeatures(net).eval().requires_grad_(False)
    return FeatureExtractor("scene", network, net.patch_colours, net.cfg.feature_dim, source, state_dict_hash(network))


EXTRACTORS: dict[str, Callable[[str], FeatureExtractor]] = {
    "inception": build_inception, "xrv": build_xrv, "thumbnail": build_thumbnail, "scene": build_scene,
}


def build_extractor(name: str, weights: str = "") -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown feature extractor '{name}'; available: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](weights)
