"""Split a tree mask into individual crowns (numpy, scipy and scikit-image).

Distance transform of the mask, smoothed; crown centres are its local maxima
at least `min_distance` pixels apart and at least `min_radius` pixels deep;
a marker watershed on the inverted distance grows each centre to its crown.
Crowns smaller than `min_pixels` are dropped. Windows of a large raster are
split one by one: a crown belongs to the window that holds its centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


@dataclass(frozen=True)
class CrownSettings:
    """Crown splitting in pixels (the caller converts from metres)."""

    min_pixels: int = 30
    min_distance: int = 6
    min_radius: float = 2.0
    smoothing: float = 1.0


def split_crowns(mask: np.ndarray, settings: CrownSettings) -> tuple[np.ndarray, np.ndarray]:
    """Crown labels (int32, 0 = none) for a boolean tree mask, and each label's centre (row, col)."""
    mask = mask.astype(bool)
    if settings.smoothing > 0:
        radius = max(1, int(round(settings.smoothing)))
        mask = ndimage.binary_opening(mask, structure=_disk(radius))
    if not mask.any():
        return np.zeros(mask.shape, np.int32), np.zeros((0, 2), int)
    distance = ndimage.distance_transform_edt(mask)
    if settings.smoothing > 0:
        distance = ndimage.gaussian_filter(distance, settings.smoothing)
    size = 2 * settings.min_distance + 1
    peaks = (distance == ndimage.maximum_filter(distance, size=size)) & (distance >= settings.min_radius) & mask
    markers, count = ndimage.label(peaks, structure=np.ones((3, 3), bool))
    centres = np.array(ndimage.center_of_mass(peaks, markers, range(1, count + 1))).reshape(-1, 2)
    labels = watershed(-distance, markers, mask=mask, connectivity=2).astype(np.int32)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < settings.min_pixels
    small[0] = False
    labels[small[labels]] = 0
    return labels.astype(np.int32), np.rint(centres).astype(int)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy**2 + xx**2 <= radius**2
