"""Ceilings: what a per-pixel model fitted to reference boxes reaches (numpy and sklearn; `make eval`).

A model is fitted to per-pixel features with the boxes as its labels (every pixel in a box is the class) and
its probability thresholded at CEILING_THRESHOLDS; the ceiling is the highest in-box precision at a given box
recall and at most a given cover (core/evaluation.py's box measures). Fitted on all pixels and scored on them,
and held out: fitted on one half of the image, scored on the other. No set of clicks labels that many pixels,
so the held-out ceiling bounds what a scorer of that kind on those features can reach from clicks. Kept apart
from evaluation.py, which runs inside QGIS without sklearn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from .evaluation import ReferenceObject, box_scores, union_mask

CEILING_MODELS = ("linear", "boosted")
"""`ceiling`'s models: an L2 logistic regression, and gradient-boosted trees (non-linear)."""
CEILING_SAMPLE_STEP = 7
"""`ceiling` fits its model on every 7th pixel of the pixels it is fitted to."""
CEILING_THRESHOLDS = np.linspace(0.3, 0.97, 40)
"""`ceiling` thresholds the probability at these quantiles of it (the mask covers 3 % to 70 % of the pixels)."""
BOOSTED_BINS = 255
"""The boosted model splits each feature between these many equal-count bins of the pixels it is fitted on."""


@dataclass(frozen=True)
class Ceiling:
    """`ceiling`'s in-box precision at the box recall asked: fitted on every pixel and scored on them, and
    held out (the left half scored by the model fitted on the right half, and the right half by the left's)."""

    fitted_on_all: float
    held_out: tuple[float, float]


def ceiling(features: np.ndarray, valid: np.ndarray, objects: list[ReferenceObject], model: str,
            recall: float, max_cover_of_boxes: float = np.inf) -> Ceiling:
    """The highest in-box precision at box recall ≥ `recall` of a per-pixel `model` (CEILING_MODELS) fitted to
    (h, w, D) `features` with the objects as labels, over the CEILING_THRESHOLDS of its probability, where the
    mask covers at most `max_cover_of_boxes` × the share of the scored pixels in an object (0: none reaches that
    recall within that cover). Held out, each half of the image (split between columns) is scored against the
    objects centred in it, cut to it; the pixels of the other half's objects are not scored."""
    inside = union_mask(objects, valid.shape)
    half = valid.shape[1] // 2
    scaled = (features - features[valid].mean(0)) / np.maximum(features[valid].std(0), 1e-12)

    def scored(fitted_on: np.ndarray, columns: slice) -> float:
        fitted = _ceiling_model(model).fit(scaled[fitted_on][::CEILING_SAMPLE_STEP],
                                           inside[fitted_on][::CEILING_SAMPLE_STEP])
        centred = [columns.start <= (item.cols.start + item.cols.stop) / 2 < columns.stop for item in objects]
        own = [item for item, here in zip(objects, centred) if here]
        others = union_mask([item for item, here in zip(objects, centred) if not here], valid.shape)
        scored_on = np.zeros_like(valid)
        scored_on[:, columns] = valid[:, columns]
        scored_on &= ~others | union_mask(own, valid.shape)
        probability = np.zeros(valid.shape)
        probability[scored_on] = fitted.predict_proba(scaled[scored_on])[:, 1]
        max_cover = max_cover_of_boxes * inside[scored_on].mean()
        return precision_at_recall(probability, scored_on, clipped(own, columns), recall, max_cover)

    left, right = slice(0, half), slice(half, valid.shape[1])
    fitted_left, fitted_right = np.zeros_like(valid), np.zeros_like(valid)
    fitted_left[:, left], fitted_right[:, right] = valid[:, left], valid[:, right]
    return Ceiling(scored(valid, slice(0, valid.shape[1])), (scored(fitted_right, left), scored(fitted_left, right)))


def _ceiling_model(model: str) -> LogisticRegression | Pipeline:
    if model == "linear":
        return LogisticRegression(C=1.0, max_iter=300, class_weight="balanced")
    if model == "boosted":
        return make_pipeline(QuantileBins(), HistGradientBoostingClassifier(
            max_iter=100, max_leaf_nodes=15, min_samples_leaf=200, l2_regularization=1.0, class_weight="balanced",
            random_state=0))
    raise ValueError(f"no ceiling model '{model}': use one of {', '.join(CEILING_MODELS)}")


class QuantileBins(TransformerMixin, BaseEstimator):
    """Each feature as the number of its BOOSTED_BINS equal-count bins' inner edges (quantiles of the fitted
    pixels, unweighted) at or below it. The gradient boosting that follows then bins by these few distinct values:
    given class weights, sklearn 1.9 bins by weighted quantiles computed one at a time, about 0.25 s a feature and
    so seconds a fit; the class weights still weigh every pixel's loss."""

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> QuantileBins:
        quantiles = np.linspace(0, 100, BOOSTED_BINS + 1)[1:-1]
        self.edges_ = [np.unique(np.percentile(column, quantiles, method="averaged_inverted_cdf"))
                       for column in np.asarray(features).T]
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        columns = np.asarray(features).T
        return np.stack([np.searchsorted(edges, column, side="right")
                         for edges, column in zip(self.edges_, columns)], axis=1).astype(np.float32)


def precision_at_recall(probability: np.ndarray, valid: np.ndarray, objects: list[ReferenceObject],
                        recall: float, max_cover: float = 1.0) -> float:
    """The highest in-box precision of `probability` ≥ one of its CEILING_THRESHOLDS quantiles whose box recall
    reaches `recall` with a cover of at most `max_cover` (0: none does)."""
    best = 0.0
    for threshold in np.quantile(probability[valid], CEILING_THRESHOLDS):
        scores = box_scores((probability >= threshold) & valid, objects, valid)
        if scores["box_recall"] >= recall and scores["tree_cover"] <= max_cover:
            best = max(best, scores["in_box_precision"])
    return best


def clipped(objects: list[ReferenceObject], columns: slice) -> list[ReferenceObject]:
    """The objects cut to the pixel columns `columns` (those outside them left out)."""
    kept = []
    for item in objects:
        start, stop = max(item.cols.start, columns.start), min(item.cols.stop, columns.stop)
        if stop > start:
            window = item.mask[:, start - item.cols.start:stop - item.cols.start]
            if window.any():
                kept.append(ReferenceObject(item.rows, slice(start, stop), window))
    return kept
