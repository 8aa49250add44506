"""Which clusters are trees: excess green (ExG) per cluster.

ExG is computed on chromatic coordinates, r = R / (R + G + B) and likewise g and
b, as ExG = 2g - r - b: about 0 for grey or sandy soil, clearly positive for
foliage, independent of brightness. The rule, applied to the mean ExG of each
cluster (weighted by the cluster's share of the sample):

1. split the clusters into two groups at the threshold that maximises the
   between-group variance of cluster ExG (Otsu's criterion over clusters);
2. tree clusters are those above the split whose mean ExG is at least
   `min_exg` (default 0.02), so an image without vegetation yields no trees.

The rule is overridden by giving the tree cluster ids explicitly.
"""

from __future__ import annotations

import numpy as np

from ...params import DEFAULT_MIN_EXG
from .errors import InputError


def excess_green(rgb: np.ndarray) -> np.ndarray:
    """ExG of an (..., 3) image on chromatic coordinates; 0 where the pixel is black.

    2g - r - b with g = G / (R + G + B) is 3G / (R + G + B) - 1: one division per pixel.
    """
    total = rgb.sum(-1, dtype=np.float32)
    exg = np.divide(3.0 * rgb[..., 1], total, out=np.ones_like(total), where=total > 1e-6, dtype=np.float32)
    exg -= 1.0
    return exg


def cluster_means(labels: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` per cluster id and each cluster's share of the labels."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.bincount(labels, weights=values, minlength=k)
    means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    return means, counts / max(counts.sum(), 1.0)


def tree_clusters_by_exg(
    exg: np.ndarray, weights: np.ndarray, min_exg: float = DEFAULT_MIN_EXG
) -> list[int]:
    """Tree cluster ids by the rule in the module docstring."""
    order = np.argsort(exg)
    best_split, best_score = None, -1.0
    for cut in range(1, len(order)):
        low, high = order[:cut], order[cut:]
        w_low, w_high = weights[low].sum(), weights[high].sum()
        if w_low <= 0 or w_high <= 0:
            continue
        mean_low = (exg[low] * weights[low]).sum() / w_low
        mean_high = (exg[high] * weights[high]).sum() / w_high
        score = w_low * w_high * (mean_high - mean_low) ** 2
        if score > best_score:
            best_split, best_score = cut, score
    above = order[best_split:] if best_split is not None else order
    return sorted(int(i) for i in above if exg[i] >= min_exg)


def check_tree_override(tree_clusters: list[int], k: int) -> list[int]:
    """Validate a user's list of tree cluster ids against K."""
    wrong = [i for i in tree_clusters if not 0 <= i < k]
    if wrong:
        raise InputError(
            f"Tree cluster ids {wrong} do not exist: this run has {k} clusters (ids 0..{k - 1})."
        )
    return sorted(set(tree_clusters))
