"""Frechet distance between Gaussian feature statistics, and the statistics files.

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Everything is float64 (features are accumulated in float64 too): in float32 the matrix square root
of a 2048 x 2048 product loses enough digits to move FID in the first decimal. When the product is
singular (fewer samples than feature dimensions) the square root may come out non-finite or complex
beyond round-off; as pytorch-fid and the TTUR reference do, eps is then added to both diagonals and
the root is taken again.

A statistics file (``.npz``) carries ``mu``, ``sigma``, ``num_samples`` and the extractor's name
and weights hash; ``load_stats`` refuses a file made with another extractor or other weights, the
most common reason for FID numbers that do not reproduce. The one foreign format read is the ADM
reference batch (``VIRTUAL_imagenet256_labeled.npz``, what LlamaGen's ImageNet FIDs are measured
against): ``load_adm_reference_batch`` takes its ``mu`` / ``sigma``, pool3 statistics of TensorFlow's
Inception graph, the network ``inception`` ports.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg

from arra_ds.errors import InputNotFoundError, UserError
from arra_ds.io import atomic_write

SINGULAR_EPS = 1e-6
IMAGINARY_TOLERANCE = 1e-3


class StatsMismatchError(UserError, ValueError):
    """A statistics file made with a different extractor, weights or feature width."""


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the mean width {mu1.shape[0]}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on singular products; the result is checked below and retried with eps
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not _usable_root(covmean):
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not _usable_root(covmean):
        raise ValueError(
            f"matrix square root of the covariance product is not real (imaginary part up to "
            f"{np.max(np.abs(np.imag(covmean))):.3g}) even with eps={eps}; are the covariances valid?"
        )
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _usable_root(root: np.ndarray) -> bool:
    """Finite, and real up to round-off: the imaginary part of the diagonal is below
    ``IMAGINARY_TOLERANCE`` relative to the diagonal's scale (pytorch-fid uses an absolute 1e-3, which
    wrongly refuses features of large magnitude)."""
    if not np.isfinite(root).all():
        return False
    if not np.iscomplexobj(root):
        return True
    diagonal = np.diagonal(root)
    scale = max(1.0, float(np.max(np.abs(diagonal.real))))
    return float(np.max(np.abs(diagonal.imag))) <= IMAGINARY_TOLERANCE * scale


def mean_and_covariance(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64, unbiased covariance as np.cov."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


@dataclass
class FeatureStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    num_samples: int
    extractor: str
    weights_hash: str
    source: dict = field(default_factory=dict)  # what the statistics were computed from

    @classmethod
    def from_features(cls, features, extractor: str, weights_hash: str, source: dict | None = None) -> "FeatureStats":
        mu, sigma = mean_and_covariance(features)
        return cls(mu, sigma, int(np.asarray(features).shape[0]), extractor, weights_hash, dict(source or {}))

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> None:
        encoded = io.BytesIO()
        np.savez(
            encoded,
            mu=self.mu,
            sigma=self.sigma,
            num_samples=np.int64(self.num_samples),
            extractor=np.str_(self.extractor),
            weights_hash=np.str_(self.weights_hash),
            source=np.str_(json.dumps(self.source, sort_keys=True)),
        )
        atomic_write(path, encoded.getvalue())

    def check_compatible(self, extractor: str, weights_hash: str, where: str) -> None:
        if self.extractor != extractor or self.weights_hash != weights_hash:
            raise StatsMismatchError(
                f"{where} was computed with extractor '{self.extractor}' (weights {self.weights_hash[:16]}), "
                f"but this evaluation uses '{extractor}' (weights {weights_hash[:16]}); FID between them is "
                "meaningless. Recompute the reference statistics with the same extractor and weights."
            )


def load_stats(path: str | Path, extractor: str | None = None, weights_hash: str | None = None) -> FeatureStats:
    """Read a statistics ``.npz``; with ``extractor``/``weights_hash`` given, refuse a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"statistics file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma", "num_samples", "extractor", "weights_hash") if k not in data.files]
        if missing:
            raise StatsMismatchError(
                f"{path} lacks {missing}: it is not an arra_ds statistics file (pytorch-fid's .npz has no extractor "
                "name or weights hash, so it cannot be checked). Recompute it with launch/fid_stats.py"
            )
        stats = FeatureStats(
            mu=data["mu"].astype(np.float64),
            sigma=data["sigma"].astype(np.float64),
            num_samples=int(data["num_samples"]),
            extractor=str(data["extractor"]),
            weights_hash=str(data["weights_hash"]),
            source=json.loads(str(data["source"])) if "source" in data.files else {},
        )
    if extractor is not None and weights_hash is not None:
        stats.check_compatible(extractor, weights_hash, str(path))
    return stats


ADM_REFERENCE_KEYS = ("mu", "sigma")
# The network behind an ADM reference batch: TensorFlow's 2015-12-05 Inception graph (pool_3), of which
# the ``inception`` extractor is the PyTorch port (pytorch-fid's weights).
ADM_REFERENCE_NETWORK = "tensorflow-inception-2015-12-05 (ADM evaluator)"


def is_arra_stats_file(path: str | Path) -> bool:
    """Does ``path`` hold arra_ds statistics (with extractor name and weights hash), not a foreign .npz?"""
    with np.load(Path(path), allow_pickle=False) as data:
        return "extractor" in data.files


def load_adm_reference_batch(path: str | Path) -> FeatureStats:
    """The pool3 statistics of an ADM reference batch (guided-diffusion's evaluator format: ``mu`` [2048],
    ``sigma`` [2048, 2048], plus images and spatial statistics that are not read)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"reference batch {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ADM_REFERENCE_KEYS if k not in data.files]
        if missing:
            raise StatsMismatchError(
                f"{path} lacks {missing}: not an ADM reference batch (VIRTUAL_imagenet256_labeled.npz has mu and sigma) "
                "nor an arra_ds statistics file (launch/fid_stats.py)"
            )
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsMismatchError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the statistics of one feature width")
    source = {"format": "ADM reference batch", "file": str(path), "network": ADM_REFERENCE_NETWORK}
    return FeatureStats(mu, sigma, num_samples=0, extractor="inception", weights_hash=ADM_REFERENCE_NETWORK, source=source)


def read_reference(path: str | Path, extractor_name: str, weights_hash: str) -> tuple[FeatureStats, str | None]:
    """(statistics, a note for the report or None) from ``path``: an arra_ds statistics file (checked against the
    extractor and its weights) or, for ``inception``, the ADM reference batch LlamaGen's numbers use."""
    if is_arra_stats_file(path) or extractor_name != "inception":
        return load_stats(path, extractor_name, weights_hash), None
    note = (
        f"reference {path} is an ADM reference batch: TensorFlow Inception statistics, compared with this PyTorch "
        "port's features (pytorch-fid weights); FID can differ slightly from the ADM evaluator's"
    )
    return load_adm_reference_batch(path), note
