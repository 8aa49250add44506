"""Per-tile features on disk: computed once, read back for clustering and assignment.

Each tile keeps its PCA-projected features (float16), the valid fraction and the
mean ExG of every grid cell. Memory stays bounded whatever the raster size: only
a few tiles are held in memory at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TileFeatures:
    """Grid-cell data of one tile: features (h, w, C), valid fraction and ExG (h, w)."""

    features: np.ndarray
    valid: np.ndarray
    exg: np.ndarray


class FeatureStore:
    """A folder of tile feature files keyed by (row, col), with a small read cache."""

    def __init__(self, folder: str | Path, cache_tiles: int = 64) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[tuple[int, int], TileFeatures] = OrderedDict()
        self._cache_tiles = cache_tiles

    def _path(self, key: tuple[int, int]) -> Path:
        return self.folder / f"tile_{key[0]}_{key[1]}.npz"

    def put(self, key: tuple[int, int], tile: TileFeatures) -> None:
        np.savez(
            self._path(key),
            features=tile.features.astype(np.float16),
            valid=tile.valid.astype(np.float16),
            exg=tile.exg.astype(np.float16),
        )
        self._cache.pop(key, None)

    def get(self, key: tuple[int, int]) -> TileFeatures:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with np.load(self._path(key)) as data:
            tile = TileFeatures(
                data["features"].astype(np.float32),
                data["valid"].astype(np.float32),
                data["exg"].astype(np.float32),
            )
        self._cache[key] = tile
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile
