"""Where the features sit on the raster: the tile grid, the feature cells, blending and sampling.

Grid cell g covers the pixels [g*stride, g*stride + cell_size) of the raster, so its
centre lies at g*stride + cell_size/2. Tiles start on multiples of the stride, so
a cell id means the same place in every tile; where tiles overlap their features
are blended with tent weights, and pixels take values between cell centres by
bilinear interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .features import pool_to_grid
from .store import FeatureStore
from .tiling import TileGrid, Window
from .trees import excess_green

MIN_VALID_FRACTION = 0.5


class CellGeometry(Protocol):
    """What an extractor tells about its cells: the grid step and the pixels one cell covers."""

    stride: int
    cell_size: int


@dataclass(frozen=True)
class FeatureGrid:
    """The tile grid of a raster and the feature cells on it (stride and cell size in pixels)."""

    tiles: TileGrid
    stride: int
    cell_size: int

    @classmethod
    def of_extractor(cls, tiles: TileGrid, extractor: CellGeometry) -> FeatureGrid:
        """The grid an extractor puts its features on."""
        return cls(tiles, extractor.stride, extractor.cell_size)

    @classmethod
    def of_store(cls, tiles: TileGrid, store: FeatureStore) -> FeatureGrid:
        """The grid a complete store's features were extracted on."""
        geometry = store.extractor()
        return cls(tiles, int(geometry["stride"]), int(geometry["cell_size"]))

    def describe(self) -> dict:
        """The cell geometry, kept with the stored features."""
        return {"stride": self.stride, "cell_size": self.cell_size}

    def cell_statistics(self, rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The valid share and the mean ExG of the valid pixels of each feature cell of a tile."""
        if valid.all():
            cell_exg = pool_to_grid(excess_green(rgb), self.stride, self.cell_size)
            return np.ones_like(cell_exg), cell_exg
        cell_valid = pool_to_grid(valid, self.stride, self.cell_size)
        cell_exg = pool_to_grid(excess_green(rgb) * valid, self.stride, self.cell_size)
        cell_exg /= np.maximum(cell_valid, 1e-6)
        return cell_valid, cell_exg

    def cell_window(self, block: Window) -> tuple[range, range, np.ndarray, np.ndarray]:
        """The global feature cells a block's bilinear interpolation needs, and each pixel's fractional cell."""
        tiles, stride = self.tiles, self.stride
        grid_rows = (tiles.rows - 1) * tiles.step // stride + tiles.tile_height // stride
        grid_cols = (tiles.cols - 1) * tiles.step // stride + tiles.tile_width // stride
        rows_at = _cell_coordinates(block.y, block.height, stride, self.cell_size)
        cols_at = _cell_coordinates(block.x, block.width, stride, self.cell_size)
        rows = range(max(0, math.floor(rows_at[0])), min(grid_rows, math.floor(rows_at[-1]) + 2))
        cols = range(max(0, math.floor(cols_at[0])), min(grid_cols, math.floor(cols_at[-1]) + 2))
        return rows, cols, rows_at - rows.start, cols_at - cols.start

    def blended(self, store: FeatureStore, rows: range, cols: range) -> tuple[np.ndarray, np.ndarray]:
        """Blended projected features and valid fraction on the global cells rows × cols."""
        stride = self.stride
        ramp = self.tiles.overlap // stride
        accumulated: np.ndarray | None = None
        weight_sum = np.zeros((len(rows), len(cols)), dtype=np.float32)
        valid_sum = np.zeros_like(weight_sum)
        x0, y0 = cols.start * stride, rows.start * stride
        for tile in self.tiles.tiles_covering(x0, y0, cols.stop * stride, rows.stop * stride):
            data = store.get((tile.row, tile.col))
            tr0, tc0 = tile.y // stride, tile.x // stride
            r0, r1 = max(rows.start, tr0), min(rows.stop, tr0 + data.valid.shape[0])
            c0, c1 = max(cols.start, tc0), min(cols.stop, tc0 + data.valid.shape[1])
            if r0 >= r1 or c0 >= c1:
                continue
            tent = np.outer(_tent(data.valid.shape[0], ramp), _tent(data.valid.shape[1], ramp))
            local = (slice(r0 - tr0, r1 - tr0), slice(c0 - tc0, c1 - tc0))
            out = (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))
            weight = tent[local] * np.maximum(data.valid[local], 1e-3)
            if accumulated is None:
                accumulated = np.zeros((len(rows), len(cols), data.features.shape[-1]), dtype=np.float32)
            accumulated[out] += weight[..., None] * data.features[local]
            weight_sum[out] += weight
            valid_sum[out] += weight * data.valid[local]
        safe = np.maximum(weight_sum, 1e-12)
        return accumulated / safe[..., None], valid_sum / safe

    def image(self) -> FeatureImage:
        """The feature cells over the raster, one pixel each (cell g centred on pixel g * stride + cell_size / 2)."""
        half = self.cell_size / 2
        rows = max(1, math.ceil((self.tiles.height - half) / self.stride))
        cols = max(1, math.ceil((self.tiles.width - half) / self.stride))
        return FeatureImage(self, rows, cols, half - self.stride / 2)


@dataclass(frozen=True)
class FeatureImage:
    """The first three feature components on the feature grid, scaled to 0..255; `offset` is the pixel
    position of its first pixel's corner in the raster."""

    grid: FeatureGrid
    rows: int
    cols: int
    offset: float

    def blocks(self, store: FeatureStore, samples: np.ndarray,
               block_cells: int = 256) -> Iterator[tuple[int, int, np.ndarray]]:
        """(row, col, uint8 (h, w, 3)) blocks; components stretched between their 2nd and 98th percentile."""
        components = min(3, samples.shape[1])
        low = np.percentile(samples[:, :components], 2, axis=0)
        high = np.percentile(samples[:, :components], 98, axis=0)
        span = np.where(high > low, high - low, 1.0)
        for row in range(0, self.rows, block_cells):
            for col in range(0, self.cols, block_cells):
                cells_r = range(row, min(row + block_cells, self.rows))
                cells_c = range(col, min(col + block_cells, self.cols))
                features, valid = self.grid.blended(store, cells_r, cells_c)
                scaled = np.zeros((len(cells_r), len(cells_c), 3), np.float32)
                scaled[..., :components] = (features[..., :components] - low) / span
                image = (np.clip(scaled, 0, 1) * 254 + 1).astype(np.uint8)
                image[valid < MIN_VALID_FRACTION] = 0
                yield row, col, image


def bilinear_sample(values: np.ndarray, rows_at: np.ndarray, cols_at: np.ndarray) -> np.ndarray:
    """(C, len(rows_at), len(cols_at)) float32 samples of (h, w, C) `values` at fractional cells, border-clamped
    (a view of a (rows, cols, C) array: each pixel's C values lie together)."""
    low_rows, high_rows, row_weight = _neighbours(rows_at, values.shape[0])
    low_cols, high_cols, col_weight = _neighbours(cols_at, values.shape[1])
    grid = np.asarray(values, dtype=np.float32)
    rows = grid[low_rows] * (1 - row_weight)[:, None, None] + grid[high_rows] * row_weight[:, None, None]
    sampled = rows[:, low_cols]
    sampled *= (1 - col_weight)[None, :, None]
    high = rows[:, high_cols]
    high *= col_weight[None, :, None]
    sampled += high
    return sampled.transpose(2, 0, 1)


def _neighbours(at: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells below and above each fractional position (clamped to [0, size - 1]) and the upper one's weight."""
    at = np.clip(at, 0, size - 1)
    low = np.floor(at).astype(np.intp)
    return low, np.minimum(low + 1, size - 1), (at - low).astype(np.float32)


def _cell_coordinates(start: int, size: int, stride: int, cell_size: int) -> np.ndarray:
    """Fractional grid-cell coordinate of each pixel centre (cell g is centred at g*s + cell_size/2)."""
    return (np.arange(start, start + size, dtype=np.float64) + 0.5 - cell_size / 2) / stride


def _tent(cells: int, ramp: int) -> np.ndarray:
    """Blending weight across one tile axis: 1 inside, falling towards the borders."""
    if ramp <= 0:
        return np.ones(cells, dtype=np.float32)
    position = np.arange(cells, dtype=np.float32) + 0.5
    edge = np.minimum(position, cells - position) / ramp
    return np.clip(edge, 0.05, 1.0)
