"""Evaluation: FID (Inception, XRV DenseNet), MS-SSIM, CLIP-Score and the distributed eval runner."""

from arra_ds.eval.fid import FeatureStats, frechet_distance, load_stats

__all__ = ["FeatureStats", "frechet_distance", "load_stats"]
