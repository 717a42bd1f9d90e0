"""PNG files of generated and real images, shared by generation and evaluation.

Generated images are written as 8-bit RGB PNG and every metric reads them back from the PNG, so a
resumed evaluation computes exactly what an uninterrupted one does. Pixel conversion and the
Lumina-mGPT crop come from ``arra_ds.data.images`` (the pre-tokenization path), so real images are
prepared for evaluation exactly as for training.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arra_ds.data.images import resize_and_center_crop, to_rgb
from arra_ds.errors import InputNotFoundError
from arra_ds.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write uint8 [H, W, 3] atomically (temporary file + rename): a file that exists is complete."""
    encoded = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(encoded, format="PNG")
    atomic_write(path, encoded.getvalue())


def load_rgb(path: str | Path) -> np.ndarray:
    """Any image file -> uint8 [H, W, 3] (transparency blended onto white, as for VQ encoding)."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(to_rgb(img), dtype=np.uint8).copy()


def fit_to_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A real image at the generated size: Lumina-mGPT's BOX-halve + BICUBIC + centre crop."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(resize_and_center_crop(Image.fromarray(image), (width, height)), dtype=np.uint8).copy()


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def to_chw_batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays of one size -> uint8 [B, 3, H, W]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
