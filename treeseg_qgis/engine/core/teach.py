"""Click-to-teach: a few example locations of a class (trees, dead trees, roofs…) score every pixel.

The features at each example (blended over tiles, bilinear between cells) are
the prototypes; t and o are a pixel's best cosine similarity to an example of
the class and to an example of something else. With examples of both the score
is the logistic 1 / (1 + exp(−(t − o) / 0.1)), so 0.5 means "as close to the
other examples as to the class"; with class examples only, it is (1 + t) / 2.
Scores run from 0 to 1; the class mask is score ≥ threshold, and moving the
threshold needs no model run (the scores are a raster of their own).

The threshold comes from the examples themselves (`choose_threshold`): each
example is scored by the prototypes of all the others (leave one out), and the
threshold is the cut that best separates those held-out scores (balanced
accuracy), in the middle of the widest gap among the best cuts. That needs at
least two examples of each side, and held-out scores that separate them (accuracy
at least 0.75); otherwise it falls back to 0.5, "as close to the other examples as
to the class", and says why. A threshold the user sets wins over the chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import InputError
from .examples import Example
from .feature_grid import FeatureGrid, bilinear_sample
from .progress import Progress
from .segmentation import NODATA, RasterSource
from .store import FeatureStore
from .tiling import Window

SIMILARITY_NODATA = -1.0
CONTRAST = 0.1
MIN_EXAMPLES_TO_FIT = 2
MIN_HELD_OUT_ACCURACY = 0.75
FALLBACK_THRESHOLD = 0.5
ONE_SIDED_THRESHOLD = 0.6


@dataclass(frozen=True)
class Threshold:
    """The threshold a teach run uses, where it came from ('chosen', 'user' or 'fallback') and why."""

    value: float
    source: str
    note: str
    chosen: float | None = None
    held_out_accuracy: float | None = None


@dataclass
class Prototypes:
    """Unit feature vectors of the class examples (`trees`) and of the other examples (`others`)."""

    trees: np.ndarray
    others: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Class score in 0..1 of (..., C) features (see the module docstring)."""
        unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
        best_tree = (unit @ self.trees.T).max(-1)
        if len(self.others):
            margin = best_tree - (unit @ self.others.T).max(-1)
            return 1.0 / (1.0 + np.exp(-margin / CONTRAST))
        return (1.0 + best_tree) / 2.0

    def held_out_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Each example's score by the prototypes of all the other examples, and whether it is a class example."""
        scores = [Prototypes(np.delete(self.trees, i, 0), self.others).score(self.trees[i])
                  for i in range(len(self.trees))]
        scores += [Prototypes(self.trees, np.delete(self.others, i, 0)).score(self.others[i])
                   for i in range(len(self.others))]
        return np.array(scores, dtype=np.float64), np.arange(len(scores)) < len(self.trees)

    def choose_threshold(self, user_threshold: float | None = None) -> Threshold:
        """The threshold from the examples (module docstring); `user_threshold` wins when given."""
        chosen = accuracy = None
        if min(len(self.trees), len(self.others)) >= MIN_EXAMPLES_TO_FIT:
            chosen, accuracy = separating_threshold(*self.held_out_scores())
        if user_threshold is not None:
            return Threshold(user_threshold, "user", f"threshold {user_threshold:.2f} set by the user", chosen,
                             accuracy)
        if chosen is not None and accuracy >= MIN_HELD_OUT_ACCURACY:
            return Threshold(chosen, "chosen", f"threshold {chosen:.2f} chosen from the {len(self.trees)} + "
                             f"{len(self.others)} examples (leave-one-out accuracy {accuracy:.2f})", chosen, accuracy)
        if chosen is not None:
            return Threshold(FALLBACK_THRESHOLD, "fallback", f"the examples do not separate well (leave-one-out "
                             f"accuracy {accuracy:.2f}): using {FALLBACK_THRESHOLD:.2f}; add examples or set the "
                             "threshold", chosen, accuracy)
        fallback = FALLBACK_THRESHOLD if len(self.others) else ONE_SIDED_THRESHOLD
        return Threshold(fallback, "fallback", f"too few examples to choose a threshold (needs "
                         f"{MIN_EXAMPLES_TO_FIT} of the class and {MIN_EXAMPLES_TO_FIT} of something else, got "
                         f"{len(self.trees)} and {len(self.others)}): using {fallback:.2f}")


def separating_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The cut with the best balanced accuracy, in the middle of the widest gap among equals; (cut, accuracy)."""
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 0.01], (values[:-1] + values[1:]) / 2, [values[-1] + 0.01]])
    gaps = np.diff(np.concatenate([[values[0] - 0.02], values, [values[-1] + 0.02]]))
    accuracy = np.array([((scores[positive] >= cut).mean() + (scores[~positive] < cut).mean()) / 2 for cut in cuts])
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-9)
    pick = best[np.argmax(gaps[best])]
    return float(np.clip(cuts[pick], 0.0, 1.0)), float(accuracy[pick])


def prototypes(store: FeatureStore, grid: FeatureGrid, examples: list[Example]) -> Prototypes:
    """The features at each example, L2-normalised, split into class and other prototypes."""
    inside = [e for e in examples if 0 <= e.col < grid.tiles.width and 0 <= e.row < grid.tiles.height]
    if not any(e.is_tree for e in inside):
        raise InputError("Click-to-teach needs at least one example of the class inside the raster "
                         f"({len(examples)} given, {len(inside)} inside).")
    vectors, labels = [], []
    for example in inside:
        block = Window(int(example.col), int(example.row), 1, 1)
        rows, cols, rows_at, cols_at = grid.cell_window(block)
        features, _ = grid.blended(store, rows, cols)
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


def score_raster(source: RasterSource, store: FeatureStore, grid: FeatureGrid, found: Prototypes,
                 threshold: float, sink: ScoreSink, progress: Progress) -> tuple[int, int]:
    """Score every pixel block by block; returns (tree pixels, valid pixels)."""
    blocks = grid.tiles.blocks()
    tree_pixels = valid_pixels = 0
    for index, block in enumerate(blocks):
        progress.check()
        progress.report(index / len(blocks), f"Scoring: block {index + 1} of {len(blocks)}")
        rows, cols, rows_at, cols_at = grid.cell_window(block)
        features, _ = grid.blended(store, rows, cols)
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
