"""Distances between two sets of image features, well defined at small n: a Fréchet distance with
Ledoit-Wolf shrunk covariances (full rank even when n < feature dimension, so no singular-matrix warnings;
Ledoit & Wolf 2004) and the unbiased KID estimator (Bińkowski et al. 2018)."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets, with Ledoit-Wolf shrunk covariances."""
    from sklearn.covariance import LedoitWolf

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = LedoitWolf().fit(a).covariance_, LedoitWolf().fit(b).covariance_
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (the KID estimator), on any features."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())
