"""What an evaluation reports from its samples, shared by ``launch/eval.py`` and the in-training eval:
the FID of generated features against reference statistics, and the grid of sample images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torchvision.utils import make_grid

from arra_ds.eval.extractors import FeatureExtractor
from arra_ds.eval.fid import FeatureStats, frechet_distance
from arra_ds.generate.images import load_rgb, to_chw_batch

GRID_PADDING_PX = 2  # make_grid's default border between the images


def fid_score(features: np.ndarray, extractor: FeatureExtractor, reference: FeatureStats) -> float:
    """FID of generated ``features`` [N >= 2, F] (from ``extractor``) against ``reference``; the
    reference must come from the same extractor weights."""
    reference.check_compatible(extractor.name, extractor.weights_hash, "the reference statistics")
    generated = FeatureStats.from_features(features, extractor.name, extractor.weights_hash)
    return frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)


def sample_grid(image_files: list[Path]) -> np.ndarray:
    """PNG files of one size -> one near-square grid, uint8 [3, H, W] (what tensorboard shows)."""
    images = to_chw_batch([load_rgb(path) for path in image_files])  # [N, 3, h, w]
    columns = math.ceil(math.sqrt(len(image_files)))
    return make_grid(images, nrow=columns, padding=GRID_PADDING_PX).numpy()
