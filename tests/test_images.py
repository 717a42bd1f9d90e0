"""Lumina-mGPT image preprocessing: crop-size list, crop choice, deterministic centre crop, [-1, 1]."""

import numpy as np
import pytest
import torch
from PIL import Image

from arra_ds.data.images import (
    ImagePreprocessConfig,
    VQImagePreprocessor,
    choose_crop_size,
    crop_size_candidates,
    pil_to_pixels,
    pixels_to_pil,
    to_rgb,
)
from arra_ds.errors import ConfigError


def test_crop_size_candidates_for_512():
    sizes = crop_size_candidates(512)
    assert (512, 512) in sizes and (1024, 256) in sizes and (256, 1024) in sizes
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert (w // 32) * (h // 32) <= 256
        assert max(w, h) / min(w, h) <= 4
    assert len(set(sizes)) == len(sizes)
    assert sizes[0] == (1024, 256)  # the walk starts at the widest allowed crop, as Lumina-mGPT's list


@pytest.mark.parametrize(
    "image_size, expected",
    [((600, 600), (512, 512)), ((1000, 500), (704, 352)), ((500, 1000), (352, 704)), ((3000, 400), (1024, 256))],
)
def test_choose_crop_size_keeps_most_of_the_image(image_size, expected):
    assert choose_crop_size(image_size, crop_size_candidates(512)) == expected


def test_centre_crop_is_deterministic_and_aligned():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    pre = VQImagePreprocessor(ImagePreprocessConfig(target_size=128))
    first, second = pre(image), pre(image)
    assert torch.equal(first, second)
    h, w = first.shape[1:]
    assert h % 32 == 0 and w % 32 == 0 and (h // 32) * (w // 32) <= 16
    square = VQImagePreprocessor(ImagePreprocessConfig(target_size=128, crop="square"))(image)
    assert square.shape == (3, 128, 128)


def test_centre_crop_takes_the_middle():
    """A 64x192 image with a distinct middle third: the 64x64 square crop is exactly that third."""
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 200
    pixels = VQImagePreprocessor(ImagePreprocessConfig(target_size=64, crop="square"))(Image.fromarray(array))
    assert torch.allclose(pixels, torch.full_like(pixels, 200 / 255 * 2 - 1))


def test_pixels_range_and_alpha_blend():
    black_white = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    pixels = pil_to_pixels(black_white)
    assert pixels[:, 0, 0].tolist() == [-1.0, -1.0, -1.0] and pixels[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    transparent = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).tolist() == [[[255, 255, 255]] * 2] * 2  # blended onto white
    grey = Image.new("L", (2, 2), 128)
    assert to_rgb(grey).mode == "RGB"
    back = np.asarray(pixels_to_pil(pixels[None])[0])
    assert back.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_target_size_validated():
    with pytest.raises(ConfigError, match="multiple of 32"):
        VQImagePreprocessor(ImagePreprocessConfig(target_size=500))
