"""Split a tree mask into individual crowns (numpy, scipy and scikit-image).

The options (params.CrownOptions, shared with the QGIS side) are in metres and converted with the
raster's pixel size.
Distance transform of the mask, smoothed; crown centres are its local maxima
at least `min_distance_m` apart and at least `min_radius_m` deep; a marker
watershed on the inverted distance grows each centre to its crown. Crowns
smaller than `min_area_m2` are dropped. Windows of a large raster are split
one by one: a crown belongs to the window that holds its centre.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from ...params import CrownOptions


def split_crowns(mask: np.ndarray, options: CrownOptions, pixel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Crown labels (int32, 0 = none) for a boolean tree mask of `pixel_m` metre pixels, and each label's
    centre (row, col)."""
    min_pixels = max(1, int(options.min_area_m2 / pixel_m**2))
    min_distance = max(1, int(round(options.min_distance_m / pixel_m)))
    min_radius = max(1.0, options.min_radius_m / pixel_m)
    smoothing = options.smoothing_m / pixel_m
    mask = mask.astype(bool)
    if smoothing > 0:
        radius = max(1, int(round(smoothing)))
        mask = ndimage.binary_opening(mask, structure=_disk(radius))
    if not mask.any():
        return np.zeros(mask.shape, np.int32), np.zeros((0, 2), int)
    distance = ndimage.distance_transform_edt(mask)
    if smoothing > 0:
        distance = ndimage.gaussian_filter(distance, smoothing)
    size = 2 * min_distance + 1
    peaks = (distance == ndimage.maximum_filter(distance, size=size)) & (distance >= min_radius) & mask
    markers, count = ndimage.label(peaks, structure=np.ones((3, 3), bool))
    centres = np.array(ndimage.center_of_mass(peaks, markers, range(1, count + 1))).reshape(-1, 2)
    labels = watershed(-distance, markers, mask=mask, connectivity=2).astype(np.int32)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < min_pixels
    small[0] = False
    labels[small[labels]] = 0
    return labels.astype(np.int32), np.rint(centres).astype(int)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy**2 + xx**2 <= radius**2
