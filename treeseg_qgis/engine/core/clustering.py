"""PCA + k-means, fitted once on a sample and then applied to every tile.

Automatic K (the elbow rule): k-means is fitted for every K in [k_min, k_max]
and the inertia (within-cluster sum of squares) recorded. K and log(inertia)
are scaled to 0..1 and the chosen K is the point of the curve farthest below
the straight line from the first point to the last ("kneedle" on the log curve;
the log keeps one big early drop from hiding a later, sharper elbow). When even k_min clusters
leave almost nothing to explain (inertia at k_min below 1e-6 of the total
variance, e.g. a uniform image), k_min is chosen.

k-means runs on one OpenMP thread: each of its iterations on a sample of at most some tens of thousands of rows
in `pca_dims` dimensions is too little work to share, and with more threads scikit-learn's spin-wait on each other
(on two cores: 20-60x the CPU time for the same centres; on a busy machine tens of seconds instead of a fraction
of one; docs/BENCHMARKS.md, "Fixed costs").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits  # installed with scikit-learn, which uses it for the same

from ...params import DEFAULT_K_RANGE
from .errors import InputError

MINIBATCH_ABOVE = 20_000


@dataclass
class ClusterModel:
    """Cluster centres in the projected feature space."""

    centres: np.ndarray
    inertia_curve: dict[int, float] = field(default_factory=dict)
    auto_k: bool = False

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def squared_distances(self, projected: np.ndarray) -> np.ndarray:
        """(..., k) squared distances of projected features to every centre."""
        flat = projected.reshape(-1, projected.shape[-1]).astype(np.float32)
        distances = (
            (flat**2).sum(1, keepdims=True)
            - 2.0 * flat @ self.centres.T
            + (self.centres**2).sum(1)[None, :]
        )
        return np.maximum(distances, 0.0).reshape(*projected.shape[:-1], self.k)

    def assign(self, projected: np.ndarray) -> np.ndarray:
        return self.squared_distances(projected).argmin(-1)

    def reorder(self, order: np.ndarray) -> None:
        """Renumber clusters so that new id i is old id order[i]."""
        self.centres = self.centres[order]


class Projection:
    """PCA fitted on a sample of raw features; projects any (..., D) array (one sample: no rotation)."""

    def __init__(self, samples: np.ndarray, dims: int, seed: int = 0) -> None:
        if samples.shape[0] == 0:
            raise InputError("No valid pixels to fit the clustering: is the raster all nodata?")
        self.mean = samples.mean(0).astype(np.float32)
        if samples.shape[0] < 2:
            self.components = np.eye(min(dims, samples.shape[1]), samples.shape[1], dtype=np.float32)
            return
        dims = max(1, min(dims, samples.shape[0] - 1, samples.shape[1]))
        pca = PCA(n_components=dims, random_state=seed, svd_solver="auto").fit(samples)
        self.components = pca.components_.astype(np.float32)

    @classmethod
    def from_arrays(cls, mean: np.ndarray, components: np.ndarray) -> Projection:
        """A projection fitted earlier (a saved cluster model's)."""
        projection = cls.__new__(cls)
        projection.mean, projection.components = mean.astype(np.float32), components.astype(np.float32)
        return projection

    def project(self, features: np.ndarray) -> np.ndarray:
        flat = features.reshape(-1, features.shape[-1]).astype(np.float32)
        projected = (flat - self.mean) @ self.components.T
        return projected.reshape(*features.shape[:-1], self.components.shape[0])


def fit_clusters(
    projected: np.ndarray,
    k: int | None,
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    seed: int = 0,
) -> ClusterModel:
    """k-means with a fixed K, or the elbow K over k_range when k is None; on one OpenMP thread (see above)."""
    with threadpool_limits(1, user_api="openmp"):
        return _fit_clusters(projected, k, k_range, seed)


def _fit_clusters(projected: np.ndarray, k: int | None, k_range: tuple[int, int], seed: int) -> ClusterModel:
    distinct = _distinct_count(projected)
    if k is not None:
        if k < 1:
            raise InputError(f"The number of clusters must be at least 1, not {k}.")
        centres, _ = _kmeans(projected, min(k, distinct), seed)
        return ClusterModel(centres)
    k_min, k_max = k_range
    if not 1 <= k_min <= k_max:
        raise InputError(f"The automatic cluster range {k_min}..{k_max} is not valid.")
    k_max = max(1, min(k_max, distinct))
    k_min = min(k_min, k_max)
    fits = {n: _kmeans(projected, n, seed) for n in range(k_min, k_max + 1)}
    curve = {n: inertia for n, (_, inertia) in fits.items()}
    chosen = choose_elbow(curve, total_variance=float(((projected - projected.mean(0)) ** 2).sum()))
    return ClusterModel(fits[chosen][0], curve, True)


def choose_elbow(curve: dict[int, float], total_variance: float) -> int:
    """The elbow K of an inertia curve (see the module docstring)."""
    ks = sorted(curve)
    if len(ks) <= 2 or curve[ks[0]] <= 1e-6 * max(total_variance, 1e-12):
        return ks[0]
    x = (np.array(ks, dtype=float) - ks[0]) / (ks[-1] - ks[0])
    inertia = np.log(np.maximum(np.array([curve[n] for n in ks]), 1e-12))
    span = inertia[0] - inertia[-1]
    if span <= 0:
        return ks[0]
    y = (inertia - inertia[-1]) / span
    chord = 1.0 - x
    return ks[int(np.argmax(chord - y))]


def _kmeans(samples: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float]:
    if samples.shape[0] > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=3)
    model.fit(samples)
    return model.cluster_centers_.astype(np.float32), float(model.inertia_)


def _distinct_count(samples: np.ndarray, cap: int = 64) -> int:
    """Number of distinct rows, counted up to `cap` (enough to bound any K)."""
    rounded = np.round(samples[: 200_000], 5)
    return int(min(cap, np.unique(rounded, axis=0).shape[0]))
