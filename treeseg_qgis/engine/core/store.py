"""Per-tile features on disk: computed once, read back for clustering and assignment.

Each tile keeps its PCA-projected features (float16), the valid fraction and the
mean ExG of every grid cell. Memory stays bounded whatever the raster size: only
a few tiles are held in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...atomic import write_atomically
from .errors import OutputError

SUMMARY = "features.json"
SAMPLES = "samples.npz"


@dataclass
class TileFeatures:
    """Grid-cell data of one tile: features (h, w, C), valid fraction and ExG (h, w)."""

    features: np.ndarray
    valid: np.ndarray
    exg: np.ndarray


class FeatureStore:
    """A folder of tile feature files keyed by (row, col), with a small read cache.

    Once extraction finished, `features.json` and the clustering sample complete it,
    and the folder can serve later runs (see cache.py).
    """

    def __init__(self, folder: str | Path, cache_tiles: int = 64, home: Path | None = None) -> None:
        self.folder = Path(folder)
        self.home = home or self.folder
        """Where the features stay once complete: the cache entry a store built aside is renamed to."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[tuple[int, int], TileFeatures] = OrderedDict()
        self._cache_tiles = cache_tiles

    @property
    def complete(self) -> bool:
        """True when every tile and the clustering sample are stored (a finished extraction)."""
        return (self.folder / SUMMARY).is_file()

    def save_samples(self, samples: np.ndarray, exg: np.ndarray, extractor: dict) -> None:
        """Store the clustering sample and what extracted the features; marks the store complete."""
        tiles = {path.name: path.stat().st_size for path in self.folder.glob("tile_*.npz")}
        with self._writing():
            np.savez(self.folder / SAMPLES, samples=samples.astype(np.float32), exg=exg.astype(np.float32))
            write_atomically(self.folder / SUMMARY, json.dumps({"extractor": extractor, "tiles": tiles}, indent=1))

    def adopt(self, other: FeatureStore) -> None:
        """Move the files of a complete store (e.g. one filled window by window) into this one; the summary
        goes last, so this store is complete only once every tile is in."""
        with self._writing():
            for path in sorted(other.folder.glob("tile_*.npz")) + [other.folder / SAMPLES, other.folder / SUMMARY]:
                shutil.move(path, self.folder / path.name)
        self._cache.clear()

    def load_samples(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.folder / SAMPLES) as data:
            return data["samples"], data["exg"].astype(np.float64)

    def extractor(self) -> dict:
        """How the stored features were made (method, model, stride, cell size)."""
        return json.loads((self.folder / SUMMARY).read_text())["extractor"]

    def model(self) -> dict:
        """What made the stored features, for the run record: the extractor's facts without the cell geometry."""
        return {key: value for key, value in self.extractor().items() if key not in ("stride", "cell_size")}

    def _path(self, key: tuple[int, int]) -> Path:
        return self.folder / f"tile_{key[0]}_{key[1]}.npz"

    def put(self, key: tuple[int, int], tile: TileFeatures) -> None:
        with self._writing():
            np.savez(
                self._path(key),
                features=tile.features.astype(np.float16),
                valid=tile.valid.astype(np.float16),
                exg=tile.exg.astype(np.float16),
            )
        self._cache.pop(key, None)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A full or failing disk is an OutputError that names the folder and the ways out."""
        try:
            yield
        except OSError as error:
            raise OutputError(f"Cannot store features in {self.folder}: {error.strerror or error}. Free some "
                              "space, choose another cache folder (--cache-dir) or turn the cache off "
                              "(--no-cache).") from error

    def get(self, key: tuple[int, int]) -> TileFeatures:
        """One tile's stored features (float32)."""
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
