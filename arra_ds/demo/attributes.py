"""The attribute model of the demo scenes: it reads a picture's background and, slot by slot, which
shape of which colour and size stands there (``SceneAttributes``).

It judges generated pictures against their prompts (``CaptionSpec.check``: prompt fidelity) and its
penultimate layer is a feature space for FID in the scene domain, as torchxrayvision's DenseNet (a
classifier of findings) is for chest X-rays. ``arra_ds.study`` trains it on VQ-reconstructed scenes.

The network sees the picture as the VQ tokenizer does: the mean colour of each ``CODE_PATCH_PX``
square, [B, 3, h, w] for an h x w code grid (a demo VQGAN code is a patch colour, see
``arra_ds.demo.models``); two conv layers, a linear layer to ``feature_dim`` features (GELU), and
one linear read-out per attribute:

    background [B, len(BACKGROUNDS)]
    kinds      [B, len(SLOTS), 1 + len(SHAPES)]   (index 0 = empty slot)
    colours    [B, len(SLOTS), len(COLOURS)]      (meaningful where the slot holds a shape)
    sizes      [B, len(SLOTS), len(SIZES)]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from arra_ds.demo.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SLOTS, SceneAttributes, SlotShape
from arra_ds.errors import InputNotFoundError
from arra_ds.tokens.layout import CODE_PATCH_PX

BACKGROUND_NAMES = tuple(BACKGROUNDS)
KIND_NAMES = ("empty", *SHAPES)
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
WEIGHTS_FILE = "attribute_net.safetensors"
CONFIG_FILE = "attribute_net.json"
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # patch colours in [0, 1] -> roughly zero mean, unit spread


@dataclass
class AttributeNetConfig:
    code_size: int = 12  # the picture's side in VQ codes (pictures are code_size * 16 px square)
    channels: int = 32  # width of the conv layers
    feature_dim: int = 64  # width of the penultimate layer (the FID features)


@dataclass
class AttributeLogits:
    background: torch.Tensor  # [B, len(BACKGROUNDS)]
    kinds: torch.Tensor  # [B, len(SLOTS), len(KIND_NAMES)]
    colours: torch.Tensor  # [B, len(SLOTS), len(COLOURS)]
    sizes: torch.Tensor  # [B, len(SLOTS), len(SIZES)]


class SceneAttributeNet(nn.Module):
    def __init__(self, cfg: AttributeNetConfig):
        super().__init__()
        self.cfg = cfg
        channels = cfg.channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.GELU(),
        )
        self.to_features = nn.Linear(channels * cfg.code_size * cfg.code_size, cfg.feature_dim)
        slots = len(SLOTS)
        self.background = nn.Linear(cfg.feature_dim, len(BACKGROUND_NAMES))
        self.kinds = nn.Linear(cfg.feature_dim, slots * len(KIND_NAMES))
        self.colours = nn.Linear(cfg.feature_dim, slots * len(COLOUR_NAMES))
        self.sizes = nn.Linear(cfg.feature_dim, slots * len(SIZE_NAMES))

    @property
    def image_size(self) -> int:
        return self.cfg.code_size * CODE_PATCH_PX

    def patch_colours(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pictures [B, 3, H, W] -> normalised mean colour per code patch [B, 3, h, w]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"the attribute model reads {self.image_size} x {self.image_size} pictures ({self.cfg.code_size} x "
                f"{self.cfg.code_size} codes), got {tuple(images.shape[-2:])}"
            )
        return self.normalise(F.avg_pool2d(images.float(), kernel_size=CODE_PATCH_PX))

    @staticmethod
    def normalise(colours: torch.Tensor) -> torch.Tensor:
        """Patch colours on the 0..255 scale [B, 3, h, w] -> the network's input."""
        return (colours.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD

    def features_of_colours(self, colours: torch.Tensor) -> torch.Tensor:
        """Normalised patch colours [B, 3, h, w] -> penultimate features [B, feature_dim]."""
        return F.gelu(self.to_features(self.convs(colours).flatten(1)))

    def forward(self, colours: torch.Tensor) -> AttributeLogits:
        features = self.features_of_colours(colours)
        batch, slots = features.shape[0], len(SLOTS)
        return AttributeLogits(
            background=self.background(features),
            kinds=self.kinds(features).view(batch, slots, -1),
            colours=self.colours(features).view(batch, slots, -1),
            sizes=self.sizes(features).view(batch, slots, -1),
        )

    @torch.inference_mode()
    def read(self, images: torch.Tensor) -> list[SceneAttributes]:
        """uint8 pictures [B, 3, H, W] -> what each one shows."""
        logits = self(self.patch_colours(images.to(next(self.parameters()).device)))
        background = logits.background.argmax(-1).tolist()
        kinds, colours, sizes = (t.argmax(-1).tolist() for t in (logits.kinds, logits.colours, logits.sizes))
        scenes = []
        for b in range(len(background)):
            slots = {
                slot: None if kinds[b][s] == 0 else SlotShape(KIND_NAMES[kinds[b][s]], COLOUR_NAMES[colours[b][s]], SIZE_NAMES[sizes[b][s]])
                for s, slot in enumerate(SLOTS)
            }
            scenes.append(SceneAttributes(BACKGROUND_NAMES[background[b]], slots))
        return scenes


class SceneFeatures(nn.Module):
    """The attribute model up to its penultimate layer: normalised patch colours -> [B, feature_dim]."""

    def __init__(self, net: SceneAttributeNet):
        super().__init__()
        self.net = net

    def forward(self, colours: torch.Tensor) -> torch.Tensor:
        return self.net.features_of_colours(colours)


def attribute_targets(scenes: list[SceneAttributes]) -> dict[str, torch.Tensor]:
    """Class indices of the ground truth: background [B], kinds / colours / sizes [B, len(SLOTS)];
    colours and sizes of empty slots are -100 (not trained)."""
    ignore = -100
    background = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    kinds = torch.zeros(len(scenes), len(SLOTS), dtype=torch.long)
    colours = torch.full((len(scenes), len(SLOTS)), ignore, dtype=torch.long)
    sizes = torch.full((len(scenes), len(SLOTS)), ignore, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for s, slot in enumerate(SLOTS):
            shape = scene.slots[slot]
            if shape is not None:
                kinds[b, s] = KIND_NAMES.index(shape.kind)
                colours[b, s] = COLOUR_NAMES.index(shape.colour)
                sizes[b, s] = SIZE_NAMES.index(shape.size)
    return {"background": background, "kinds": kinds, "colours": colours, "sizes": sizes}


def attribute_loss(logits: AttributeLogits, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the mean cross-entropies of the four read-outs."""
    loss = F.cross_entropy(logits.background, targets["background"])
    for name in ("kinds", "colours", "sizes"):
        values = getattr(logits, name)
        loss = loss + F.cross_entropy(values.flatten(0, 1), targets[name].flatten(), ignore_index=-100)
    return loss


def save_attribute_net(net: SceneAttributeNet, out_dir: str | Path) -> Path:
    """Write the weights (safetensors) and the config (JSON) to ``out_dir``; returns the weights file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(net.cfg), indent=2))
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(weights))
    return weights


def load_attribute_net(weights: str | Path) -> SceneAttributeNet:
    """The attribute model from its weights file (its config JSON lies beside it), in eval mode."""
    weights = Path(weights)
    config_file = weights.parent / CONFIG_FILE
    if not weights.is_file() or not config_file.is_file():
        raise InputNotFoundError(
            f"attribute model {weights} (and {CONFIG_FILE} beside it) not found; the study trains it "
            "(<study dir>/models/judge/)"
        )
    net = SceneAttributeNet(AttributeNetConfig(**json.loads(config_file.read_text())))
    net.load_state_dict(load_file(str(weights)), strict=True)
    return net.eval().requires_grad_(False)
