"""Disentanglement scores from latent codes and known generative factors (dSprites-style shapes).

Why MIG (Chen et al., 2018, "Isolating Sources of Disentanglement in VAEs"): it needs no extra
classifier training (unlike the β-VAE metric), so it is deterministic and cheap enough to run at
the end of every VAE run. For each factor v_k it takes the two latent dimensions with the highest
mutual information I(z_j; v_k), and averages their gap normalised by the factor's entropy:

    MIG = 1/K · Σ_k ( I(z_{j(1)}; v_k) − I(z_{j(2)}; v_k) ) / H(v_k)

Continuous latents are discretised into ``n_bins`` equal-width bins per dimension (the usual
estimator of the original paper's public code). 1 means each factor lives in exactly one latent
dimension, 0 means no dimension is more informative about a factor than another.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mutual_info_score


def _discretize(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins per column; a constant column maps to a single bin."""
    out = np.zeros(values.shape, dtype=np.int64)
    for j in range(values.shape[1]):
        col = values[:, j]
        lo, hi = float(col.min()), float(col.max())
        if hi - lo < 1e-12:
            continue
        edges = np.linspace(lo, hi, n_bins + 1)[1:-1]
        out[:, j] = np.digitize(col, edges)
    return out


def _entropy(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_info_matrix(latents: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """I(z_j; v_k) in nats, shape [latent_dims, factors]."""
    z = _discretize(np.asarray(latents, dtype=np.float64), n_bins)
    v = np.asarray(factors)
    mi = np.zeros((z.shape[1], v.shape[1]))
    for j in range(z.shape[1]):
        for k in range(v.shape[1]):
            mi[j, k] = mutual_info_score(v[:, k], z[:, j])
    return mi


def mig_score(latents: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> float:
    """Mutual information gap of ``latents`` [N, D] against integer ``factors`` [N, K].

    Factors that take a single value in the sample (entropy 0) are skipped; with fewer than two
    latent dimensions the gap is the top MI alone (there is no second dimension to compete).
    """
    latents = np.asarray(latents)
    factors = np.asarray(factors)
    if latents.ndim != 2 or factors.ndim != 2 or latents.shape[0] != factors.shape[0]:
        raise ValueError(f"latents {latents.shape} and factors {factors.shape} must be [N, D] and [N, K]")
    mi = mutual_info_matrix(latents, factors, n_bins)
    gaps = []
    for k in range(factors.shape[1]):
        h = _entropy(factors[:, k])
        if h <= 0:
            continue
        top = np.sort(mi[:, k])[::-1]
        second = top[1] if top.shape[0] > 1 else 0.0
        gaps.append((top[0] - second) / h)
    return float(np.mean(gaps)) if gaps else 0.0
