"""Click-to-teach: a few example locations of one class or several score every pixel.

What is learnt (`teach_classifier`):
- Around each click, the features of a Gaussian neighbourhood (σ = `neighbourhood_sigma`: one feature
  cell, at least MIN_SIGMA_PX pixels; samples out to 2σ), weighted by distance; every click weighs the same
  in all, and every class the same (class balancing), so one click decides nothing on its own.
- An L2-regularised (multinomial) logistic regression on those features (the run's PCA components, scaled by
  the RMS norm of the raster's feature sample so the regularisation means the same on every kind of feature).
- Calibration by temperature: each click is scored by a model fitted without it (leave one click out), and
  one temperature T is chosen so that those held-out probabilities fit (Platt's smoothed targets, so that a
  perfect separation of ten clicks does not make T go to zero). A temperature moves no decision boundary.
- The rule: a pixel belongs to the class whose calibrated probability is highest; with one class taught
  against something else, P(class) ≥ 0.5 (a threshold the user gives wins). With several classes a pixel is
  *unsure* where no class reaches UNSURE_BELOW. The leave-one-out accuracy is reported, never used to move
  the threshold: that is what made one odd click swing the old nearest-prototype rule.
- The raster as a whole (its feature sample) is one more example of "something else", weighing as much as
  one click (BACKGROUND_WEIGHT): the class must look more like its clicks than like the raster at large,
  which keeps the mask from spreading over the raster (measured: docs/QUALITY.md). With examples of the class
  only, it is the whole of "something else".
Measured and left out (RGB per pixel, 5 + 5 clicks, 2026-12-07): the local mean and spread of the features as
more features (they raise what a model fitted to every box reaches, but 5 + 5 clicks overfit the extra
dimensions: fewer click sets reach the goal), smoothing the probability or a minimum object size before the
threshold (precision up, box recall down by as much: the best precision at the goal's recall does not move), an
RBF expansion around the clicks (helps a two-looks class, loses more elsewhere). Gradient-boosted trees instead of
the logistic regression (a proxy of this module outside it, same click sets and neighbourhoods, P ≥ 0.5;
2026-12-07): OSBS_029 trees 0 of 5 click sets on RGB, RGB with local context and DINOv3 (random weights); SOAP_061
trees 1 of 5 on RGB (the linear proxy 0); on local context they mark little beyond the clicks (box recall 0.07-0.43).
The ceilings in docs/QUALITY.md (core/ceiling.py): fitted to every box and scored on the other half of the image,
no per-pixel model, linear or boosted, on those features reaches OSBS_029's goal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from sklearn.linear_model import LogisticRegression

from .errors import InputError
from .examples import OTHER, Example
from .feature_grid import FeatureGrid, bilinear_sample
from .progress import Progress
from .segmentation import NODATA, RasterFeatures
from .store import FeatureStore
from .tiling import Window

SIMILARITY_NODATA = -1.0
DEFAULT_THRESHOLD = 0.5
UNSURE_BELOW = 0.5
MAX_CLASSES = 254
"""Class values 1..254 in a Byte raster: 0 is unsure, 255 nodata."""
MIN_SIGMA_PX = 6.0
REGULARISATION_C = 10.0
TEMPERATURES = np.exp(np.linspace(np.log(0.02), np.log(50.0), 81))
BACKGROUND_WEIGHT = 1.0
MIN_HELD_OUT_ACCURACY = 0.75
BACKGROUND_SAMPLES = 2000


@dataclass(frozen=True)
class Threshold:
    """The threshold a teach run uses, where it came from ('calibrated' or 'user') and what it means."""

    value: float
    source: str
    note: str
    held_out_accuracy: float | None = None


@dataclass
class TaughtClassifier:
    """A linear model over the scaled features: class names, weights (K, D), offsets (K,), temperature."""

    classes: list[str]
    scale: float
    weights: np.ndarray
    offsets: np.ndarray
    temperature: float = 1.0

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(..., K) logits of (..., D) features."""
        return (features * self.scale) @ self.weights.T + self.offsets

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(..., K) calibrated class probabilities of (..., D) features."""
        return softmax(self.logits(features) / self.temperature)


@dataclass
class Taught:
    """A taught classifier and what the examples said about it."""

    classifier: TaughtClassifier
    counts: dict[str, int]
    held_out_accuracy: float | None
    one_sided: bool
    notes: list[str] = field(default_factory=list)

    def threshold(self, user_threshold: float | None = None) -> Threshold:
        """The class threshold of a one-class teach: the user's, else 0.5 on the calibrated probability."""
        accuracy = self.held_out_accuracy
        if user_threshold is not None:
            return Threshold(user_threshold, "user", f"threshold {user_threshold:.2f} set by the user", accuracy)
        counts = " + ".join(str(n) for n in self.counts.values())
        if accuracy is None:
            how = "too few examples to check them against each other"
        else:
            how = f"leave-one-out accuracy {accuracy:.2f}"
            if accuracy < MIN_HELD_OUT_ACCURACY:
                how += ": the examples do not separate well, add examples or set the threshold"
        return Threshold(DEFAULT_THRESHOLD, "calibrated", f"threshold {DEFAULT_THRESHOLD:.2f} on calibrated "
                         f"probabilities from the {counts} examples ({how})", accuracy)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def neighbourhood_sigma(grid: FeatureGrid) -> float:
    """The σ in pixels of the Gaussian neighbourhood around each click: one feature cell, ≥ MIN_SIGMA_PX."""
    return max(float(grid.cell_size), MIN_SIGMA_PX)


def class_names(examples: list[Example], class_name: str) -> list[str]:
    """The taught classes: the examples' labels in order of appearance, or `class_name` against OTHER."""
    labels = [e.label for e in examples if e.label]
    if labels:
        return list(dict.fromkeys(labels))
    return [class_name, OTHER]


def neighbourhood_features(store: FeatureStore, grid: FeatureGrid, example: Example,
                           sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) features around a click (bilinear, within 2σ) and their Gaussian weights, summing to 1."""
    width, height = grid.tiles.width, grid.tiles.height
    reach = int(np.ceil(2 * sigma))
    x0, y0 = max(0, int(example.col) - reach), max(0, int(example.row) - reach)
    x1, y1 = min(width, int(example.col) + reach + 1), min(height, int(example.row) + reach + 1)
    rows, cols, rows_at, cols_at = grid.cell_window(Window(x0, y0, x1 - x0, y1 - y0))
    features, _ = grid.blended(store, rows, cols)
    step = max(1, int(round(sigma / 3)))
    ys, xs = np.arange(y0, y1, step), np.arange(x0, x1, step)
    sampled = bilinear_sample(features, rows_at[ys - y0], cols_at[xs - x0])  # (D, len(ys), len(xs))
    distance2 = (ys[:, None] + 0.5 - example.row) ** 2 + (xs[None, :] + 0.5 - example.col) ** 2
    near = distance2 <= (2 * sigma) ** 2
    if not near.any():
        near = distance2 <= distance2.min()
    weights = np.exp(-distance2[near] / (2 * sigma**2))
    return sampled[:, near].T.astype(np.float64), weights / weights.sum()


def teach_classifier(store: FeatureStore, grid: FeatureGrid, examples: list[Example], raster_sample: np.ndarray,
                     class_name: str) -> Taught:
    """Fit, check by leave-one-click-out and calibrate the classifier (module docstring)."""
    inside = [e for e in examples if 0 <= e.col < grid.tiles.width and 0 <= e.row < grid.tiles.height]
    classes = class_names(inside or examples, class_name)
    labels = [classes.index(e.label) if e.label else (0 if e.is_tree else 1) for e in inside]
    counts = {name: labels.count(index) for index, name in enumerate(classes)}
    multi = any(e.label for e in examples)
    if len(classes) > MAX_CLASSES:
        raise InputError(f"Teaching takes at most {MAX_CLASSES} classes at once, not {len(classes)}: is the class "
                         "field the right one?")
    if multi and sum(n > 0 for n in counts.values()) < 2:
        raise InputError("Teaching several classes needs examples of at least two classes inside the raster: "
                         f"{_where(examples, inside)} ({_listed(counts)}).")
    if not multi and not counts[classes[0]]:
        raise InputError(f"Click-to-teach needs at least one example of '{classes[0]}' inside the raster: "
                         f"{_where(examples, inside)}, {counts[classes[0]]} of them '{classes[0]}'.")
    sigma = neighbourhood_sigma(grid)
    clicks = [neighbourhood_features(store, grid, example, sigma) for example in inside]
    scale = 1.0 / max(float(np.sqrt((raster_sample.astype(np.float64) ** 2).sum(1).mean())), 1e-12)
    notes = [f"{len(examples) - len(inside)} of {len(examples)} examples lie outside the raster and were left "
             "out"] if len(inside) < len(examples) else []
    one_sided = not multi and not counts[OTHER]
    if not multi:
        background = _background(raster_sample)
        clicks.append((background, np.full(len(background), BACKGROUND_WEIGHT / len(background))))
        labels.append(1)
    if one_sided:
        notes.append("no examples of something else: the class is told apart from the raster as a whole")
    present = sorted(set(labels))
    classifier = _fit(clicks, labels, present, classes, scale)
    held_out = _held_out(clicks, labels, present, classes, scale, skip_last=not multi)
    accuracy = None
    if held_out is not None:
        logits, truth = held_out
        classifier.temperature = _temperature(logits, truth, len(classes))
        accuracy = _balanced_accuracy(logits.argmax(1), truth)
    return Taught(classifier, counts, accuracy, one_sided, notes)


def _where(examples: list[Example], inside: list[Example]) -> str:
    """E.g. '3 examples given, all inside the raster' or '3 examples given, 1 inside the raster'."""
    placed = "all" if len(inside) == len(examples) else str(len(inside))
    return f"{len(examples)} example{'s' if len(examples) != 1 else ''} given, {placed} inside the raster"


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def _background(raster_sample: np.ndarray) -> np.ndarray:
    """Up to BACKGROUND_SAMPLES rows of the raster's feature sample, evenly spread."""
    step = max(1, len(raster_sample) // BACKGROUND_SAMPLES)
    return raster_sample[::step].astype(np.float64)


def _fit(clicks: list[tuple[np.ndarray, np.ndarray]], labels: list[int], present: list[int], classes: list[str],
         scale: float) -> TaughtClassifier:
    """The regularised logistic regression on the clicks' neighbourhoods, classes balanced; classes without
    examples get a logit that never wins."""
    per_class = {c: labels.count(c) for c in present}
    features = np.concatenate([f for f, _ in clicks]) * scale
    targets = np.concatenate([np.full(len(f), label) for (f, _), label in zip(clicks, labels)])
    weights = np.concatenate([w * len(clicks) / (len(present) * per_class[label])
                              for (_, w), label in zip(clicks, labels)])
    model = LogisticRegression(C=REGULARISATION_C, max_iter=500)
    model.fit(features, targets, sample_weight=weights)
    dims = features.shape[1]
    coef, intercept = np.zeros((len(classes), dims)), np.full(len(classes), -1e4)
    if len(present) == 2:  # sklearn keeps one row for two classes: the second's log-odds
        coef[present[1]], intercept[present[1]] = model.coef_[0] / 2, model.intercept_[0] / 2
        coef[present[0]], intercept[present[0]] = -model.coef_[0] / 2, -model.intercept_[0] / 2
    else:
        coef[present], intercept[present] = model.coef_, model.intercept_
    return TaughtClassifier(classes, scale, coef, intercept)


def _held_out(clicks: list[tuple[np.ndarray, np.ndarray]], labels: list[int], present: list[int],
              classes: list[str], scale: float, skip_last: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Each click's mean logits by a model fitted without it (only clicks whose class keeps another
    click; with `skip_last` the last, the raster's sample, is never held out nor counted as a click); None
    when no clicks of two classes can be held out."""
    logits, truth = [], []
    held = labels[:-1] if skip_last else labels
    for index, label in enumerate(held):
        if held.count(label) < 2:
            continue
        rest = [c for i, c in enumerate(clicks) if i != index]
        rest_labels = [x for i, x in enumerate(labels) if i != index]
        model = _fit(rest, rest_labels, present, classes, scale)
        features, weights = clicks[index]
        logits.append(weights @ model.logits(features))
        truth.append(label)
    if len(set(truth)) < 2:
        return None
    return np.array(logits), np.array(truth)


def _temperature(logits: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """The temperature whose held-out probabilities best fit Platt's smoothed targets."""
    counts = np.bincount(truth, minlength=classes)
    hit = (counts[truth] + 1.0) / (counts[truth] + 2.0)
    targets = np.tile(((1.0 - hit) / max(classes - 1, 1))[:, None], (1, classes))
    targets[np.arange(len(truth)), truth] = hit
    balance = 1.0 / counts[truth]
    losses = [-(balance[:, None] * targets * np.log(np.maximum(softmax(logits / t), 1e-12))).sum()
              for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def _balanced_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([(predicted[truth == c] == c).mean() for c in np.unique(truth)]))


class ScoreSink(Protocol):
    """Where score blocks go: (K, h, w) float32 probabilities (SIMILARITY_NODATA = nodata) and the labels."""

    def write(self, x: int, y: int, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """Store one window."""


def score_raster(raster: RasterFeatures, classifier: TaughtClassifier, decide, sink: ScoreSink,
                 progress: Progress) -> np.ndarray:
    """Probabilities of every pixel block by block, and the labels `decide` gives them ((K, h, w) → (h, w)
    uint8); returns the pixel count per label value (0..255)."""
    grid = raster.grid
    blocks = grid.tiles.blocks()
    counts = np.zeros(256, dtype=np.int64)
    for index, block in enumerate(blocks):
        progress.check()
        progress.report(index / len(blocks), f"Scoring: block {index + 1} of {len(blocks)}")
        rows, cols, rows_at, cols_at = grid.cell_window(block)
        features, _ = grid.blended(raster.store, rows, cols)
        cell_probabilities = classifier.probabilities(features.astype(np.float64)).astype(np.float32)
        probabilities = bilinear_sample(cell_probabilities, rows_at, cols_at)
        valid = raster.source.read_valid(block.x, block.y, block.width, block.height)
        labels = decide(probabilities)
        labels[~valid] = NODATA
        probabilities[:, ~valid] = SIMILARITY_NODATA
        counts += np.bincount(labels.ravel(), minlength=256)
        sink.write(block.x, block.y, probabilities, labels)
    progress.report(1.0, "Scored")
    return counts


def class_mask_rule(threshold: float):
    """One class against something else: 1 where P(class) ≥ threshold, else 0."""
    return lambda probabilities: (probabilities[0] >= threshold).astype(np.uint8)


def classes_rule(unsure_value: int, unsure_below: float = UNSURE_BELOW):
    """Several classes: 1 + the most probable class, `unsure_value` where none reaches `unsure_below`."""
    def decide(probabilities: np.ndarray) -> np.ndarray:
        labels = (probabilities.argmax(0) + 1).astype(np.uint8)
        labels[probabilities.max(0) < unsure_below] = unsure_value
        return labels
    return decide
