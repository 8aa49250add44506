"""A cluster model kept in a file (`.treeseg`): fitted once on a survey, applied unchanged to any raster.

The file is a NumPy zip (no pickles): a JSON header (format version, what extracted the features, the
settings, the survey's value scaling, K, the inertia curve, the tree rule and its per-cluster values) and
three arrays (the PCA mean and components, the cluster centres). Written atomically; a file of another
version or a damaged one is refused with the reason. Version 1 (before the survey's value scaling) is
read when its rasters were Byte (value / 255, nothing to store) and refused otherwise, since each of its
rasters was stretched on its own. A run whose raster or settings differ from the model's is refused,
naming what differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .clustering import ClusterModel, Projection
from .errors import InputError

FORMAT = "treeseg-cluster-model"
FORMAT_VERSION = 2
BYTE_ONLY_VERSION = 1
"""The format before the survey's value scaling: still read for Byte rasters, which it does not change."""
CLIPPED_SHARE_WARNING = 0.1
"""A raster with more of a band outside the survey's value range than this is reported (the survey as a
whole has 4 % there, below its 2nd and above its 98th percentile)."""
SUFFIX = ".treeseg"


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
        }

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (core/atomic.py)."""
        path = Path(path)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            header=np.frombuffer(json.dumps(self.header()).encode(), dtype=np.uint8),
            pca_mean=self.projection.mean, pca_components=self.projection.components,
            centres=self.fit.clusters.centres,
        )
        write_atomically(path, buffer.getvalue(), f"the cluster model {path}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SurveyModel:
        """Read a file `save` wrote; anything else is an InputError saying why."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                mean, components, centres = data["pca_mean"], data["pca_components"], data["centres"]
        except FileNotFoundError:
            raise InputError(f"The cluster model {path} does not exist.") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as error:
            raise InputError(f"{path} is not a treeseg cluster model, or it is damaged ({error}): fit it again "
                             "(python -m treeseg_qgis fit).") from None
        if header.get("format") != FORMAT:
            raise InputError(f"{path} is not a treeseg cluster model.")
        version = header.get("version")
        if version == BYTE_ONLY_VERSION and "stretch" in header.get("scaling", ""):
            raise InputError(f"The cluster model {path} (format version {version}) was fitted with each raster "
                             "stretched to its own value range, so its clusters do not mean the same in every "
                             "raster: fit it again with this version, which scales the whole survey alike.")
        if version not in (FORMAT_VERSION, BYTE_ONLY_VERSION):
            raise InputError(f"The cluster model {path} has format version {version}; this treeseg "
                             f"reads version {FORMAT_VERSION}: fit it again with this version.")
        projection = Projection.from_arrays(mean, components)
        clusters = ClusterModel(centres.astype(np.float32),
                                {int(k): float(v) for k, v in header["inertia_curve"].items()},
                                bool(header["automatic_k"]))
        fit = ClusterFit(clusters, list(header["tree_clusters"]), header["tree_rule"],
                         np.array(header["cluster_exg"]), np.array(header["cluster_weights"]))
        value_ranges = {int(number): (float(lo), float(hi))
                        for number, (lo, hi) in header.get("value_ranges", {}).items()}
        model = cls(projection, fit, header["settings"], header["extractor"], header["scaling"], value_ranges,
                    header["inputs"])
        if model.projection_id != header["projection_id"]:
            raise InputError(f"The cluster model {path} is damaged (its PCA does not match its header): fit it "
                             "again.")
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
