"""Image preprocessing for the Chameleon VQGAN, as Lumina-mGPT pre-tokenization does it.

Lumina-mGPT (``lumina_mgpt/data/item_processor.py``) picks, for a target size S, the 32-px-aligned
crop size (w, h) with w * h <= (S / 32)^2 cells and aspect ratio <= 4 that keeps most of the image
(``generate_crop_size_list`` + ``var_center_crop``), halves the image with a BOX filter while it is
at least twice that size, resizes with BICUBIC so it covers the crop, and crops. Lumina-mGPT crops at
a random offset (augmentation); pre-tokenization here always takes the centre (deterministic), as
ARRA's pre-tokenizer does. Transparent images are blended onto white. Pixels map to [-1, 1] as
Chameleon's ``ImageTokenizer`` does (x / 255 * 2 - 1).

``crop="square"`` always crops S x S (ARRA's ``item_processor_new.py`` behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import GRID_CELL_PX

PIXEL_MAX = 255.0
# Image files by extension (torchvision's ImageFolder IMG_EXTENSIONS), compared case-insensitively (ImageNet: .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImagePreprocessConfig:
    target_size: int = 512  # area budget: crops hold (target_size / 32)^2 grid cells (512 -> 32 x 32 codes)
    crop: Literal["var", "square"] = "var"  # var: aspect-preserving crop list (Lumina-mGPT); square: S x S
    max_aspect_ratio: float = 4.0  # longest / shortest side of the allowed crop sizes

    def validate(self) -> None:
        if self.target_size < GRID_CELL_PX or self.target_size % GRID_CELL_PX:
            raise ConfigError(
                f"target_size={self.target_size} must be a positive multiple of {GRID_CELL_PX} "
                "(Lumina-mGPT's grid cell), e.g. 512 or 768"
            )
        if self.crop not in ("var", "square"):
            raise ConfigError(f"crop={self.crop!r} must be 'var' or 'square'")
        if self.max_aspect_ratio < 1.0:
            raise ConfigError(f"max_aspect_ratio={self.max_aspect_ratio} must be >= 1")


def crop_size_candidates(target_size: int, max_aspect_ratio: float = 4.0, cell: int = GRID_CELL_PX) -> list[tuple[int, int]]:
    """All (width, height) in cells of ``cell`` px with w * h <= (target / cell)^2 and ratio <= max.

    Walks the staircase boundary w * h <= n as Lumina-mGPT's ``generate_crop_size_list`` does, so the
    list (and its order) is the same.
    """
    num_cells = (target_size // cell) ** 2
    sizes = []
    wp, hp = num_cells, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_aspect_ratio:
            sizes.append((wp * cell, hp * cell))
        if (hp + 1) * wp <= num_cells:
            hp += 1
        else:
            wp -= 1
    return sizes


def choose_crop_size(image_size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate whose aspect ratio best matches the image (largest kept fraction).

    Ties go to the larger (w, h), as Lumina-mGPT's ``sorted(..., reverse=True)[0]`` does.
    """
    w, h = image_size

    def kept_fraction(size: tuple[int, int]) -> float:
        cw, ch = size
        return min(cw / w, ch / h) / max(cw / w, ch / h)

    return max(candidates, key=lambda size: (kept_fraction(size), size))


def resize_and_center_crop(image: Image.Image, crop_size: tuple[int, int]) -> Image.Image:
    """BOX-halve while >= 2x the crop, BICUBIC-resize to cover it, take the centre crop_size."""
    cw, ch = crop_size
    while image.size[0] >= 2 * cw and image.size[1] >= 2 * ch:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = max(cw / image.size[0], ch / image.size[1])
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - cw) // 2
    top = (image.size[1] - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency blended onto a white background (Chameleon's _whiten_transparency)."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:4] / PIXEL_MAX
    blended = (1 - alpha) * PIXEL_MAX + alpha * rgba[:, :, :3]
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32).transpose(2, 0, 1)  # [3, H, W]
    # numpy, not torch: torch would spin up its intra-op threads for each small image
    return torch.from_numpy(np.ascontiguousarray(array / PIXEL_MAX * 2.0 - 1.0))


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 [B, H, W, 3] (or [H, W, 3])."""
    scaled = ((pixels.detach().float().clamp(-1, 1) + 1.0) / 2.0 * PIXEL_MAX).round().to(torch.uint8)
    return scaled.movedim(-3, -1).cpu().numpy()


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    return [Image.fromarray(a, "RGB") for a in pixels_to_uint8(pixels)]


class VQImagePreprocessor:
    """PIL image -> VQGAN input [3, h, w] in [-1, 1], h and w multiples of 32 (Lumina-mGPT cropping)."""

    def __init__(self, cfg: ImagePreprocessConfig):
        cfg.validate()
        self.cfg = cfg
        self.candidates = crop_size_candidates(cfg.target_size, cfg.max_aspect_ratio)

    def crop_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        if self.cfg.crop == "square":
            return (self.cfg.target_size, self.cfg.target_size)
        return choose_crop_size(image_size, self.candidates)

    def crop(self, image: Image.Image) -> Image.Image:
        return resize_and_center_crop(image, self.crop_size(image.size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_pixels(self.crop(image))
