"""What an evaluation reports from its samples, shared by ``launch/eval.py`` and the in-training eval:
the FID of generated features against reference statistics, and the grid of sample images.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from arra_ds.eval.extractors import FeatureExtractor
from arra_ds.eval.fid import FeatureStats, frechet_distance
from arra_ds.generate.images import load_rgb, to_chw_batch

GRID_PADDING_PX = 2  # make_grid's default border between the images
CAPTION_LINES = 3  # caption lines under each tile of a captioned grid (longer captions end with "...")
CAPTION_MARGIN_PX = 2


def fid_score(features: np.ndarray, extractor: FeatureExtractor, reference: FeatureStats, same_weights: bool = True) -> float:
    """FID of generated ``features`` [N >= 2, F] (from ``extractor``) against ``reference``; the reference must
    come from the same extractor weights (``same_weights=False``: a published reference of another implementation
    of the network, ADM's TensorFlow Inception batch, which the report flags)."""
    if same_weights:
        reference.check_compatible(extractor.name, extractor.weights_hash, "the reference statistics")
    generated = FeatureStats.from_features(features, extractor.name, extractor.weights_hash)
    return frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)


def sample_grid(image_files: list[Path]) -> np.ndarray:
    """PNG files of one size -> one near-square grid, uint8 [3, H, W] (what tensorboard shows)."""
    images = to_chw_batch([load_rgb(path) for path in image_files])  # [N, 3, h, w]
    columns = math.ceil(math.sqrt(len(image_files)))
    return make_grid(images, nrow=columns, padding=GRID_PADDING_PX).numpy()


def captioned_grid(image_files: list[Path], captions: list[str]) -> np.ndarray:
    """``sample_grid`` with each tile's caption (its prompt) written under it, in PIL's built-in font (no font file
    needed): uint8 [3, H, W]. Captions longer than ``CAPTION_LINES`` lines of the tile's width are cut with "..."."""
    images = to_chw_batch([load_rgb(path) for path in image_files])  # [N, 3, h, w]
    font = ImageFont.load_default()
    _, top, char_width, bottom = font.getbbox("M")
    line_height = bottom - top + CAPTION_MARGIN_PX
    width = images.shape[-1]
    chars_per_line = max(1, (width - 2 * CAPTION_MARGIN_PX) // max(1, char_width))
    band = CAPTION_LINES * line_height + 2 * CAPTION_MARGIN_PX
    tiles = []
    for image, caption in zip(images, captions):
        lines = textwrap.wrap(caption, chars_per_line, max_lines=CAPTION_LINES, placeholder="...")
        label = Image.new("RGB", (width, band), "white")
        draw = ImageDraw.Draw(label)
        for row, line in enumerate(lines):
            draw.text((CAPTION_MARGIN_PX, CAPTION_MARGIN_PX + row * line_height), line, fill="black", font=font)
        caption_chw = np.asarray(label, dtype=np.uint8).transpose(2, 0, 1)  # [3, band, w]
        tiles.append(np.concatenate([image.numpy(), caption_chw], axis=1))  # [3, h + band, w]
    columns = math.ceil(math.sqrt(len(tiles)))
    return make_grid(torch.from_numpy(np.stack(tiles)), nrow=columns, padding=GRID_PADDING_PX).numpy()
