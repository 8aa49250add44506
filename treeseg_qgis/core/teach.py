"""Click-to-teach: a few example locations become prototypes; every pixel gets a similarity.

The features at each example (blended over tiles, bilinear between cells) are
the prototypes; t and o are a pixel's best cosine similarity to a tree and to a
non-tree example. With non-tree examples the score is the logistic
1 / (1 + exp(−(t − o) / 0.1)), so 0.5 means "as close to a non-tree as to a
tree"; without, it is (1 + t) / 2. Scores run from 0 to 1; the tree mask is
score ≥ threshold, and moving the threshold needs no model run (the scores are
a raster of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import InputError
from .examples import Example
from .progress import Progress
from .segmentation import (
    NODATA,
    RasterSource,
    TileFeatureExtractor,
    bilinear_sample,
    blended_features,
    cell_window,
)
from .store import FeatureStore
from .tiling import TileGrid, Window

SIMILARITY_NODATA = -1.0
CONTRAST = 0.1


@dataclass
class Prototypes:
    trees: np.ndarray
    others: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Tree score in 0..1 of (..., C) features (see the module docstring)."""
        unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
        best_tree = (unit @ self.trees.T).max(-1)
        if len(self.others):
            margin = best_tree - (unit @ self.others.T).max(-1)
            return 1.0 / (1.0 + np.exp(-margin / CONTRAST))
        return (1.0 + best_tree) / 2.0


def prototypes(store: FeatureStore, grid: TileGrid, extractor: TileFeatureExtractor,
               examples: list[Example], width: int, height: int) -> Prototypes:
    """The features at each example, L2-normalised, split into tree and non-tree prototypes."""
    inside = [e for e in examples if 0 <= e.col < width and 0 <= e.row < height]
    if not any(e.is_tree for e in inside):
        raise InputError("Click-to-teach needs at least one tree example inside the raster "
                         f"({len(examples)} given, {len(inside)} inside).")
    vectors, labels = [], []
    for example in inside:
        block = Window(int(example.col), int(example.row), 1, 1)
        rows, cols, rows_at, cols_at = cell_window(block, grid, extractor)
        features, _ = blended_features(store, grid, extractor.stride, rows, cols)
        vectors.append(bilinear_sample(features, rows_at, cols_at)[:, 0, 0].numpy())
        labels.append(example.is_tree)
    matrix = np.array(vectors, dtype=np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    chosen = np.array(labels)
    return Prototypes(matrix[chosen], matrix[~chosen])


class ScoreSink(Protocol):
    """Where score blocks go: float32 scores (SIMILARITY_NODATA = nodata) and the 0/1/255 mask."""

    def write(self, x: int, y: int, scores: np.ndarray, trees: np.ndarray) -> None:
        """Store one window."""


def score_raster(source: RasterSource, store: FeatureStore, grid: TileGrid, extractor: TileFeatureExtractor,
                 found: Prototypes, threshold: float, sink: ScoreSink, progress: Progress) -> tuple[int, int]:
    """Score every pixel block by block; returns (tree pixels, valid pixels)."""
    blocks = grid.blocks()
    tree_pixels = valid_pixels = 0
    for index, block in enumerate(blocks):
        progress.check()
        progress.report(index / len(blocks), f"Scoring: block {index + 1} of {len(blocks)}")
        rows, cols, rows_at, cols_at = cell_window(block, grid, extractor)
        features, _ = blended_features(store, grid, extractor.stride, rows, cols)
        cell_scores = found.score(features)[..., None]
        scores = bilinear_sample(cell_scores, rows_at, cols_at)[0].numpy()
        valid = source.read_valid(block.x, block.y, block.width, block.height)
        trees = (scores >= threshold).astype(np.uint8)
        trees[~valid] = NODATA
        scores[~valid] = SIMILARITY_NODATA
        tree_pixels += int((trees == 1).sum())
        valid_pixels += int(valid.sum())
        sink.write(block.x, block.y, scores.astype(np.float32), trees)
    progress.report(1.0, "Scored")
    return tree_pixels, valid_pixels
