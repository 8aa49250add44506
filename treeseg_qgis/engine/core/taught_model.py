"""A taught classifier kept in a file (`.treeseg`): taught once on one raster of a survey, applied unchanged to
the others, so every raster gets the same classes and legend.

It works on a survey's features: the features projected with a survey cluster model's PCA (the file records
that PCA's id, and what extracted the features, the weights' identity included); a run with another PCA or
other features is refused. The file is a NumPy zip (no pickles): a JSON header (format, version, classes,
the threshold rule, feature scale, temperature, the PCA id, the extractor) and two arrays (weights, offsets),
checked against the header when read; written atomically. A damaged or edited file is refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import read_header_and_arrays, write_header_and_arrays
from .teach import TaughtClassifier

FORMAT = "treeseg-taught-classifier"
FORMAT_VERSION = 1
EXTRACTOR_CHECKED = ("method", "model_id", "untrained", "normalisation", "feature_dim")


@dataclass
class TaughtModel:
    """A classifier with what it needs to be applied elsewhere: its PCA id, extractor and (one class) class."""

    classifier: TaughtClassifier
    projection_id: str
    extractor: dict
    weights: dict
    multi: bool

    def header(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "classes": self.classifier.classes,
                "multi": self.multi, "scale": self.classifier.scale, "temperature": self.classifier.temperature,
                "projection_id": self.projection_id, "extractor": self.extractor, "weights": self.weights}

    def save(self, path: str | Path) -> Path:
        """Write the file, whole or not at all."""
        return write_header_and_arrays(path, "taught classifier", self.header(), {
            "weights": self.classifier.weights.astype(np.float64),
            "offsets": self.classifier.offsets.astype(np.float64)})

    @classmethod
    def load(cls, path: str | Path) -> TaughtModel:
        """Read a file `save` wrote; anything else is an InputError of one line saying why."""
        header, arrays = read_header_and_arrays(path, "taught classifier", FORMAT, ("weights", "offsets"),
                                                "teach it again (python -m treeseg_qgis teach … --save-classifier)")
        if header.get("version") != FORMAT_VERSION:
            raise InputError(f"The taught classifier {path} has format version {header.get('version')}; this "
                             f"treeseg reads version {FORMAT_VERSION}: teach it again with this version.")
        try:
            return cls._checked(header, arrays["weights"], arrays["offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"The taught classifier {path} is damaged or was edited ({error}): teach it "
                             "again.") from None

    @classmethod
    def _checked(cls, header: dict, weights: np.ndarray, offsets: np.ndarray) -> TaughtModel:
        classes = header["classes"]
        if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
                or not all(isinstance(name, str) and name.strip() for name in classes)):
            raise ValueError("its classes are not two or more distinct names")
        if weights.ndim != 2 or weights.shape[0] != len(classes) or offsets.shape != (len(classes),):
            raise ValueError(f"weights {weights.shape} and offsets {offsets.shape} do not fit {len(classes)} "
                             "classes")
        scale, temperature = float(header["scale"]), float(header["temperature"])
        if not (np.isfinite(weights).all() and np.isfinite(offsets).all() and math.isfinite(scale) and scale > 0
                and math.isfinite(temperature) and temperature > 0):
            raise ValueError("a weight, offset, scale or temperature is not a finite positive number")
        if not isinstance(header["extractor"], dict) or not isinstance(header["projection_id"], str):
            raise ValueError("no extractor or PCA id")
        classifier = TaughtClassifier(list(classes), scale, weights.astype(np.float64), offsets.astype(np.float64),
                                      temperature)
        return cls(classifier, header["projection_id"], header["extractor"], header.get("weights") or {},
                   bool(header["multi"]))

    def check_features(self, projection_id: str, extractor: dict, dims: int) -> None:
        """Refuse features projected with another PCA, or extracted by another model or weights."""
        differences = [f"{name} {extractor.get(name)!r} (the classifier: {self.extractor.get(name)!r})"
                       for name in EXTRACTOR_CHECKED if extractor.get(name) != self.extractor.get(name)]
        if self.classifier.weights.shape[1] != dims:
            differences.append(f"{dims} feature components (the classifier: {self.classifier.weights.shape[1]})")
        if projection_id != self.projection_id:
            differences.insert(0, "the survey cluster model's PCA (use the cluster model it was taught with)")
        if differences:
            raise InputError("The taught classifier was taught on other features: " + "; ".join(differences) + ".")
