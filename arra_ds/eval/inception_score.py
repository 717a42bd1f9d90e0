"""Inception Score, as the ADM evaluator that LlamaGen reports with computes it.

    IS = exp( E_x KL( p(y | x) || p(y) ) )

``p(y | x)`` is the softmax of the FID Inception network's 1008 class logits without the bias
(``FIDInceptionV3.class_logits``, from the pool3 features FID already has), ``p(y)`` the mean of
``p(y | x)`` over a split. The samples are cut into consecutive splits of ``split_size`` (ADM: 5000;
50,000 samples give 10 splits) and the per-split scores averaged. Uniform predictions give 1; confident
predictions spread evenly over C classes give C.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import rel_entr

from arra_ds.eval.inception import FIDInceptionV3

ADM_SPLIT_SIZE = 5000


def inception_score(probabilities: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
    """probabilities [N, C] (rows sum to 1) -> the mean over splits of exp(mean_x KL(p(y|x) || p(y)))."""
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim != 2 or not len(probabilities):
        raise ValueError(f"need class probabilities of shape [N >= 1, C], got {probabilities.shape}")
    if split_size < 1:
        raise ValueError(f"split_size={split_size} must be >= 1")
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1)  # 0 * log 0 = 0 (a one-hot row is fine)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


@torch.inference_mode()
def class_probabilities(pool3: np.ndarray, network: FIDInceptionV3) -> np.ndarray:
    """pool3 features [N, 2048] -> p(y | x) [N, 1008] in float64 (softmax of the unbiased class logits)."""
    weight = network.fc.weight
    features = torch.as_tensor(np.asarray(pool3), dtype=torch.float64, device=weight.device)
    return torch.softmax(network.class_logits(features), dim=-1).cpu().numpy()
