"""A cluster model kept in a file (`.treeseg`): fitted once on a survey, applied unchanged to any raster.

The file is a NumPy zip (no pickles): a JSON header (format version, what extracted the features, the
settings, the survey's value scaling, K, the inertia curve, the tree rule and its per-cluster values) and
three arrays (the PCA mean and components, the cluster centres), and the weights' content identity. Written
atomically. Before use the header's types and every array's dtype, shape and finiteness are checked, K the
same everywhere: a file of another version, a pipe, a damaged or hand-edited one is refused in one line with
the reason. Version 2 (before the weights' identity) is read without that check, with a warning; version 1
(before the survey's value scaling) is read when its rasters were Byte (value / 255, nothing to store) and
refused otherwise, since each of its rasters was stretched on its own. A run whose raster, settings or weights
differ from the model's is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...params import Role, names_with
from .clustering import ClusterModel, Projection
from .errors import InputError
from .files import read_header_and_arrays, write_header_and_arrays

log = logging.getLogger("treeseg")

FORMAT = "treeseg-cluster-model"
FORMAT_VERSION = 3
UNCHECKED_WEIGHTS_VERSION = 2
"""The format before the weights' identity was recorded: still read, the weights not checked."""
BYTE_ONLY_VERSION = 1
"""The format before the survey's value scaling: still read for Byte rasters, which it does not change."""
CLIPPED_SHARE_WARNING = 0.1
"""A raster with more of a band outside the survey's value range than this is reported (the survey as a
whole has 4 % there, below its 2nd and above its 98th percentile)."""
ARRAYS = ("pca_mean", "pca_components", "centres")
SETTINGS = names_with(Role.SURVEY)
"""The run settings a model fixes (the parameters of role Role.SURVEY): a file lacking one is
refused; a run asking for other values is refused."""


@dataclass
class ClusterFit:
    """Clusters numbered by decreasing ExG, which of them are trees, and why."""

    clusters: ClusterModel
    tree_clusters: list[int]
    tree_rule: str
    cluster_exg: np.ndarray
    cluster_weights: np.ndarray


@dataclass
class SurveyModel:
    """Everything needed to label any raster of a survey with the same ids and legend."""

    projection: Projection
    fit: ClusterFit
    settings: dict
    extractor: dict
    scaling: str
    value_ranges: dict[int, tuple[float, float]]
    """The survey's stretch limits per band number (non-Byte bands; empty for Byte rasters)."""
    inputs: list[dict] = field(default_factory=list)
    weights: str | None = None
    """The weights' content identity (`weights_content`); None for a colour baseline or an older file."""

    @property
    def projection_id(self) -> str:
        """Identifies the PCA: features projected with it are only shared with runs of the same PCA."""
        digest = hashlib.sha256()
        for array in (self.projection.mean, self.projection.components):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    def header(self) -> dict:
        fit = self.fit
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "settings": self.settings,
            "extractor": self.extractor,
            "scaling": self.scaling,
            "value_ranges": {str(number): list(limits) for number, limits in self.value_ranges.items()},
            "k": fit.clusters.k,
            "automatic_k": fit.clusters.auto_k,
            "inertia_curve": {str(k): v for k, v in fit.clusters.inertia_curve.items()},
            "tree_clusters": fit.tree_clusters,
            "tree_rule": fit.tree_rule,
            "cluster_exg": [float(v) for v in fit.cluster_exg],
            "cluster_weights": [float(v) for v in fit.cluster_weights],
            "projection_id": self.projection_id,
            "inputs": self.inputs,
            "weights": self.weights,
        }

    def save(self, path: str | Path) -> Path:
        """Write the file, whole or not at all."""
        return write_header_and_arrays(path, "cluster model", self.header(), {
            "pca_mean": self.projection.mean, "pca_components": self.projection.components,
            "centres": self.fit.clusters.centres})

    @classmethod
    def load(cls, path: str | Path) -> SurveyModel:
        """Read a file `save` wrote; anything else (a pipe, a damaged or hand-edited file) is one InputError
        saying why: the header and every array are checked against the format before use."""
        header, arrays = read_header_and_arrays(path, "cluster model", FORMAT, ARRAYS,
                                                "fit it again (python -m treeseg_qgis fit)")
        version = header.get("version")
        if version == BYTE_ONLY_VERSION and "stretch" in str(header.get("scaling", "")):
            raise InputError(f"The cluster model {path} (format version {version}) was fitted with each raster "
                             "stretched to its own value range, so its clusters do not mean the same in every "
                             "raster: fit it again with this version, which scales the whole survey alike.")
        if version not in (FORMAT_VERSION, UNCHECKED_WEIGHTS_VERSION, BYTE_ONLY_VERSION) or isinstance(version, bool):
            raise InputError(f"The cluster model {path} has format version {version!r}; this treeseg "
                             f"reads version {FORMAT_VERSION}: fit it again with this version.")
        problem = header_problem(header, version) or arrays_problem(header, arrays)
        if problem:
            raise InputError(f"The cluster model {path} is damaged or was edited ({problem}): fit it again "
                             "(python -m treeseg_qgis fit).")
        projection = Projection.from_arrays(arrays["pca_mean"], arrays["pca_components"])
        clusters = ClusterModel(arrays["centres"].astype(np.float32),
                                {int(k): float(v) for k, v in header["inertia_curve"].items()},
                                header["automatic_k"])
        fit = ClusterFit(clusters, list(header["tree_clusters"]), header["tree_rule"],
                         np.array(header["cluster_exg"], dtype=float), np.array(header["cluster_weights"], dtype=float))
        value_ranges = {int(number): (float(lo), float(hi))
                        for number, (lo, hi) in header.get("value_ranges", {}).items()}
        model = cls(projection, fit, header["settings"], header["extractor"], header["scaling"], value_ranges,
                    header["inputs"], header.get("weights"))
        if model.projection_id != header["projection_id"]:
            raise InputError(f"The cluster model {path} is damaged (its PCA does not match its header): fit it "
                             "again.")
        if version < FORMAT_VERSION and header["extractor"].get("method") == "dinov3":
            log.warning("The cluster model %s (format version %s) does not record its weights' identity: whether "
                        "this run's weights are the ones it was fitted with is not checked.", path, version)
        return model

    def run_settings(self) -> dict:
        """The run parameters the model fixes (settings and precision), to run a raster the way it was fitted."""
        settings = {**self.settings, "bands": tuple(self.settings["bands"])}
        if self.extractor.get("precision"):
            settings["precision"] = self.extractor["precision"].split(" ", 1)[0]  # "int8 (ONNX Runtime x.y)": int8
        return settings

    def check_run(self, settings: dict, precision: str | None, bands: tuple[int, ...], scaling: str) -> None:
        """Refuse a run whose settings (its parameters of role params.Role.SURVEY), precision, bands or value
        scaling differ from the model's; a setting only one of them has differs too."""
        asked = {**settings, "bands": list(bands), "precision": precision}
        expected = {**self.settings, "precision": self.extractor.get("precision")}
        differences = [f"{name} {asked.get(name)!r} (the model: {expected.get(name)!r})"
                       for name in {**asked, **expected} if asked.get(name) != expected.get(name)]
        if scaling_kind(scaling) != scaling_kind(self.scaling):
            differences.append(f"value scaling '{scaling_kind(scaling)}' (the model: "
                               f"'{scaling_kind(self.scaling)}')")
        if not differences and self.weights is not None and settings.get("method") == "dinov3":
            here = weights_content(settings["model"], settings.get("model_revision"))
            if here != self.weights:
                raise InputError(f"The cluster model was fitted with other weights: the model's {self.weights} "
                                 f"({self.settings.get('model')}), this run's {here or 'none found'} "
                                 f"({settings['model']}). Apply it with the weights it was fitted with, or fit a "
                                 "model for these weights.")
        if differences:
            raise InputError("The cluster model does not fit this run: " + "; ".join(differences) + ". Use the "
                             "model's settings, or fit a model for these rasters.")

    def check_extractor(self, extractor: dict) -> None:
        """Refuse features from another model, weights or feature size than the model was fitted on."""
        differences = [f"{name} {extractor.get(name)!r} (the model: {self.extractor.get(name)!r})"
                       for name in ("method", "model_id", "untrained", "normalisation", "feature_dim")
                       if extractor.get(name) != self.extractor.get(name)]
        if differences:
            raise InputError("The cluster model was fitted on other features: " + "; ".join(differences) + ".")


def weights_content(model: str, revision: str | None) -> str | None:
    """The content identity of the weights `model` loads: each file of its folder by name, size and sampled
    hash (the feature cache's file identity, core/cache.py, without the path and times, so a copy of the same
    weights elsewhere is the same); None when no folder holds them (untrained)."""
    from .models import weights_identity

    files = weights_identity(model, revision)["files"]
    if not files:
        return None
    content = sorted((name, identity["size"], identity["sample"]) for name, identity in files.items())
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def header_problem(header: dict, version: int) -> str | None:
    """What in a cluster model's header does not follow the format (None when it does)."""
    expected = {"settings": dict, "extractor": dict, "scaling": str, "k": int, "automatic_k": bool,
                "inertia_curve": dict, "tree_clusters": list, "tree_rule": str, "cluster_exg": list,
                "cluster_weights": list, "projection_id": str, "inputs": list}
    for name, kind in expected.items():
        if not _is(header.get(name), kind):
            return f"'{name}' should be {_KIND_NAMES[kind]}, not {_shown(header.get(name))}"
    if version >= FORMAT_VERSION and not (header.get("weights") is None or isinstance(header["weights"], str)):
        return f"'weights' should be text, not {_shown(header['weights'])}"
    settings, extractor, k = header["settings"], header["extractor"], header["k"]
    if k < 1:
        return f"'k' should be at least 1, not {k}"
    for name in SETTINGS:
        if name not in settings:
            return f"the settings lack '{name}'"
    kinds = {"method": str, "model": str, "stride": int, "tile_size": int, "overlap": int, "bands": list}
    for name, kind in kinds.items():
        if name in settings and not _is(settings[name], kind):
            return f"the setting '{name}' should be {_KIND_NAMES[kind]}, not {_shown(settings[name])}"
    if not all(_is(band, int) for band in settings.get("bands", [])):
        return f"the setting 'bands' should be band numbers, not {_shown(settings['bands'])}"
    if not (settings.get("model_revision") is None or isinstance(settings["model_revision"], str)):
        return f"the setting 'model_revision' should be text, not {_shown(settings['model_revision'])}"
    for name, kind in {"method": str, "model_id": str, "untrained": bool, "feature_dim": int}.items():
        if name in extractor and not _is(extractor[name], kind):
            return f"the extractor's '{name}' should be {_KIND_NAMES[kind]}, not {_shown(extractor[name])}"
    if not all(_whole_text(key) and _is(value, float) for key, value in header["inertia_curve"].items()):
        return "'inertia_curve' should map each K to a finite number"
    if not all(_is(cluster, int) and 0 <= cluster < k for cluster in header["tree_clusters"]):
        return f"'tree_clusters' should be cluster ids below K={k}, not {_shown(header['tree_clusters'])}"
    for name in ("cluster_exg", "cluster_weights"):
        if len(header[name]) != k or not all(_is(value, float) for value in header[name]):
            return f"'{name}' should be {k} finite numbers (one per cluster, K={k})"
    ranges = header.get("value_ranges", {})
    if not isinstance(ranges, dict) or not all(
            _whole_text(number) and isinstance(limits, list) and len(limits) == 2
            and all(_is(limit, float) for limit in limits) for number, limits in ranges.items()):
        return "'value_ranges' should map each band number to two finite limits"
    return None


def arrays_problem(header: dict, arrays: dict[str, np.ndarray]) -> str | None:
    """What in a cluster model's arrays does not fit the format or its header (None when all fits): the PCA
    mean (D,), its components (P, D) and the centres (K, P), all finite numbers, K the header's."""
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            return f"'{name}' should hold floating-point numbers, not {array.dtype}"
        if not np.isfinite(array).all():
            return f"'{name}' holds values that are not finite numbers (NaN or infinite)"
    mean, components, centres = arrays["pca_mean"], arrays["pca_components"], arrays["centres"]
    if mean.ndim != 1 or mean.size == 0:
        return f"'pca_mean' should be one row of numbers, not of shape {mean.shape}"
    if components.ndim != 2 or components.shape[0] == 0 or components.shape[1] != mean.size:
        return f"'pca_components' should be of shape (P, {mean.size}), not {components.shape}"
    if centres.ndim != 2 or centres.shape != (header["k"], components.shape[0]):
        return f"'centres' should be of shape ({header['k']}, {components.shape[0]}) (K, P), not {centres.shape}"
    feature_dim = header["extractor"].get("feature_dim")
    if feature_dim is not None and feature_dim != mean.size:
        return f"the PCA is for {mean.size} features, the extractor gives {feature_dim}"
    return None


_KIND_NAMES = {dict: "an object", list: "a list", str: "text", int: "a whole number", bool: "true or false",
               float: "a finite number"}


def _is(value: object, kind: type) -> bool:
    """`value` is of the JSON kind (a bool is not a number; a number is finite)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _whole_text(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def clipping_note(clipped: dict[int, float]) -> str | None:
    """A warning when more than CLIPPED_SHARE_WARNING of a band lies outside the survey's value range."""
    bands = [f"band {number}: {100 * share:.0f} %" for number, share in sorted(clipped.items())
             if share > CLIPPED_SHARE_WARNING]
    if not bands:
        return None
    return (f"Pixels outside the survey's value range, read as its darkest or brightest value ({', '.join(bands)}; "
            f"reported above {100 * CLIPPED_SHARE_WARNING:.0f} %): this raster may not belong to the survey the "
            "cluster model was fitted on.")


def scaling_kind(scaling: str) -> str:
    """A raster's value scaling without its stretch limits ('band 1: Byte / 255; …')."""
    return re.sub(r"\s*\[[^\]]*\]", "", scaling)
