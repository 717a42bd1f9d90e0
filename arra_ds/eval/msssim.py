"""MS-SSIM in its two uses for text-to-image evaluation.

- ``paired`` (the paper's form, higher is better): MS-SSIM between each generated image and the
  real image its prompt came from, averaged over samples. This is what ARRA's tables report next to
  FID ("structural similarity" to the data, MS-SSIM up arrow).
- ``diversity`` (lower = more diverse): mean MS-SSIM over all pairs of images generated for the same
  prompt, averaged over prompts with at least two samples (the usual mode-collapse check).

Images are uint8 RGB [N, 3, H, W], compared in [0, 1] (data range 1) with pytorch-msssim's
five-scale MS-SSIM (Gaussian window 11, sigma 1.5, the standard weights). The two images of a pair
must have the same size: the evaluation brings real images to the generated size first.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
from pytorch_msssim import ms_ssim

from arra_ds.errors import ConfigError

MSSSIM_SCALES = 5


@dataclass
class MSSSIMConfig:
    win_size: int = 11  # images must be larger than (win_size - 1) * 2**4 pixels
    win_sigma: float = 1.5

    def validate(self) -> None:
        if self.win_size < 3 or self.win_size % 2 == 0:
            raise ConfigError(f"ms_ssim.win_size={self.win_size} must be an odd number >= 3")
        if self.win_sigma <= 0:
            raise ConfigError(f"ms_ssim.win_sigma={self.win_sigma} must be > 0")

    def min_image_size(self) -> int:
        return (self.win_size - 1) * 2 ** (MSSSIM_SCALES - 1) + 1


def ms_ssim_per_pair(a: torch.Tensor, b: torch.Tensor, cfg: MSSSIMConfig) -> torch.Tensor:
    """uint8 [N, 3, H, W] x2 -> MS-SSIM per pair, float64 [N]."""
    if a.shape != b.shape:
        raise ValueError(f"MS-SSIM compares images of one size; got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < cfg.min_image_size():
        raise ValueError(
            f"MS-SSIM with window {cfg.win_size} needs images of at least {cfg.min_image_size()} px, got "
            f"{tuple(a.shape[-2:])}; lower ms_ssim.win_size"
        )
    x, y = a.double() / 255.0, b.double() / 255.0
    return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=cfg.win_size, win_sigma=cfg.win_sigma)


def diversity_pairs(num_samples: int) -> list[tuple[int, int]]:
    return list(combinations(range(num_samples), 2))


def diversity_ms_ssim(images: torch.Tensor, cfg: MSSSIMConfig) -> float:
    """Mean MS-SSIM over all pairs of one prompt's samples, uint8 [S >= 2, 3, H, W]."""
    pairs = diversity_pairs(images.shape[0])
    if not pairs:
        raise ValueError("the diversity form needs at least two samples of the prompt")
    first = images[[i for i, _ in pairs]]
    second = images[[j for _, j in pairs]]
    return float(ms_ssim_per_pair(first, second, cfg).mean())
