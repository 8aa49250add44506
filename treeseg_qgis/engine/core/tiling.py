"""The tile grid: overlapping windows aligned to the 16-pixel patch grid.

Tiles start at multiples of `step = tile - overlap` (a multiple of 16), so every
tile's feature cells land on one global feature grid and a cell id means the same
place in every tile. The last tile of a row or column may reach past the raster;
the missing pixels are padded and marked invalid.

A tile with invalid pixels, nodata or masked out inside the raster or padding past it, goes through the model
cropped to the bounding box of its valid pixels, rounded out to a quarter of the tile (`TileGrid.model_window`):
the model never sees the nodata nor the padding (a 1024-px raster's last tiles of 512 px hold 128 px of it: run
whole they were 2.25× its pixels, cropped 1.27×), and a tile has at most 4 × 4 shapes (crops of one shape share
a batch). A tile of the tile size whose pixels are all valid runs whole; the one tile of a raster smaller than a
tile runs as a crop. In int8 on ONNX Runtime crops run one export of free
height and width (core/onnx_int8.py `ANY_SHAPE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...catalogue import PATCH
from ...memory import RUN_OVERLAP, RUN_TILE_SIZE


@dataclass(frozen=True)
class Window:
    """A rectangle of the raster, in pixels."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Tile(Window):
    """One window of the raster and its place in the tile grid."""

    row: int
    col: int


class TileGrid:
    """Overlapping tiles covering a width × height raster."""

    def __init__(self, width: int, height: int, tile_size: int = RUN_TILE_SIZE, overlap: int = RUN_OVERLAP) -> None:
        self.width = width
        self.height = height
        self.tile_size = tile_size
        self.tile_width = min(tile_size, _ceil_to_patch(width))
        self.tile_height = min(tile_size, _ceil_to_patch(height))
        self.step = tile_size - overlap
        self.crop_step = max(PATCH, tile_size // 4 // PATCH * PATCH)
        self.overlap = overlap
        self.cols = _count(width, self.tile_width, self.step)
        self.rows = _count(height, self.tile_height, self.step)

    def __len__(self) -> int:
        return self.rows * self.cols

    def tile(self, row: int, col: int) -> Tile:
        return Tile(col * self.step, row * self.step, self.tile_width, self.tile_height, row=row, col=col)

    def tiles(self) -> list[Tile]:
        return [self.tile(r, c) for r in range(self.rows) for c in range(self.cols)]

    def model_window(self, tile: Tile, valid: np.ndarray) -> Window | None:
        """The part of a tile (in its own pixels) that goes through the model, given its valid mask (padding past
        the raster invalid): the whole tile when all its pixels are valid, else the bounding box of its valid
        pixels rounded out to `crop_step` from the tile's corner; None without a valid pixel."""
        if valid.all():
            return Window(0, 0, tile.width, tile.height)
        rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
        if rows.size == 0:
            return None
        y0, y1 = _round_out(rows[0], rows[-1] + 1, self.crop_step, tile.height)
        x0, x1 = _round_out(cols[0], cols[-1] + 1, self.crop_step, tile.width)
        return Window(x0, y0, x1 - x0, y1 - y0)

    def runs_whole(self, window: Window) -> bool:
        """Whether a model window is a whole tile of the tile size (in int8 its shape's export runs it). Any other
        window, a crop or the one tile of a raster smaller than a tile, runs cropped (the any-shape export), so
        rasters of many small sizes share one export instead of building one per size."""
        return (window.width, window.height) == (self.tile_size, self.tile_size)

    def spread(self, count: int) -> list[Tile]:
        """Up to `count` tiles spread evenly over the grid (rows and columns)."""
        if count >= len(self):
            return self.tiles()
        side = max(1, int(math.sqrt(count)))
        rows = np.unique(np.linspace(0, self.rows - 1, min(side, self.rows)).round().astype(int))
        per_row = min(count // len(rows), self.cols)
        cols = np.unique(np.linspace(0, self.cols - 1, per_row).round().astype(int))
        return [self.tile(int(r), int(c)) for r in rows for c in cols]

    def tiles_covering(self, x0: int, y0: int, x1: int, y1: int) -> list[Tile]:
        """Tiles whose pixels intersect [x0, x1) × [y0, y1)."""
        return [
            self.tile(r, c)
            for r in _index_range(y0, y1, self.tile_height, self.step, self.rows)
            for c in _index_range(x0, x1, self.tile_width, self.step, self.cols)
        ]

    def blocks(self) -> list[Window]:
        """Non-overlapping output windows, one per tile step, clipped to the raster."""
        return [
            Window(x, y, min(self.step, self.width - x), min(self.step, self.height - y))
            for y in range(0, self.height, self.step)
            for x in range(0, self.width, self.step)
        ]


def _ceil_to_patch(size: int) -> int:
    return max(PATCH, -(-size // PATCH) * PATCH)


def _round_out(start: int, stop: int, step: int, size: int) -> tuple[int, int]:
    """[start, stop) widened to multiples of `step`, the end at most `size`."""
    return int(start) // step * step, min(size, -(-int(stop) // step) * step)


def _count(size: int, tile: int, step: int) -> int:
    return 1 if size <= tile else 1 + -(-(size - tile) // step)


def _index_range(start: int, stop: int, tile: int, step: int, count: int) -> range:
    first = max(0, -(-(start - tile + 1) // step))
    last = min(count - 1, (stop - 1) // step)
    return range(first, last + 1)
