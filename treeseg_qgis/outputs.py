"""Names of the files one run writes. Standard library only: the QGIS side uses it too."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

UNTRAINED_TAG = "UNTRAINED"
DEFAULT_CLASS = "tree"
OUTPUT_KINDS = ("clusters", "trees", "polygons", "crowns", "features", "height", "preview", "elbow", "record",
                "similarity", "taught_trees", "teach_record")
SUFFIXES = {
    "clusters": "_clusters.tif",
    "trees": "_trees.tif",
    "polygons": "_polygons.gpkg",
    "crowns": "_crowns.gpkg",
    "features": "_features.tif",
    "height": "_height.tif",
    "preview": "_preview.png",
    "elbow": "_elbow.png",
    "record": "_run.json",
    "similarity": "_similarity.tif",
    "taught_trees": "_taught_trees.tif",
    "teach_record": "_teach.json",
}


@dataclass(frozen=True)
class OutputPaths:
    """The files one run writes: named after one stem in the output folder, unless given."""

    clusters: Path
    trees: Path
    polygons: Path
    crowns: Path
    features: Path
    height: Path
    preview: Path
    elbow: Path
    record: Path
    similarity: Path
    taught_trees: Path
    teach_record: Path

    @classmethod
    def for_params(cls, params: dict[str, Any], untrained: bool) -> OutputPaths:
        """Paths for a parameters dict (SegmentationParams.to_dict()); `<kind>_path` entries win."""
        stem = params.get("output_stem") or Path(params["input_path"]).stem
        method = params.get("method") or "dinov3"
        if method != "dinov3" and not params.get("output_stem"):
            stem = f"{stem}_{method}"
        if untrained:
            stem = f"{stem}_{UNTRAINED_TAG}"
        folder = Path(params["output_dir"])
        return cls(**{
            kind: Path(params[f"{kind}_path"]) if params.get(f"{kind}_path") else folder / f"{stem}{SUFFIXES[kind]}"
            for kind in OUTPUT_KINDS
        })

    def all(self) -> list[Path]:
        return [getattr(self, kind) for kind in OUTPUT_KINDS]

    def as_dict(self) -> dict[str, str]:
        return {kind: str(getattr(self, kind)) for kind in OUTPUT_KINDS}


def temporary_files(path: Path) -> list[Path]:
    """The temporary files written before `path` is renamed into place."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    return [path.with_name(path.name + ".partial"), partial, partial.with_name(partial.name + ".aux.xml")]


def remove_files(paths: list[Path]) -> None:
    """Delete finished outputs (with their .aux.xml) and their temporary files."""
    for path in paths:
        for leftover in [path, path.with_name(path.name + ".aux.xml"), *temporary_files(path)]:
            leftover.unlink(missing_ok=True)


def remove_temporary_files(params: dict[str, Any]) -> None:
    """Delete the temporary files a killed run may have left; finished files stay."""
    for untrained in (False, True):
        for path in OutputPaths.for_params(params, untrained).all():
            for leftover in temporary_files(path):
                leftover.unlink(missing_ok=True)


def class_slug(class_name: str) -> str:
    """A class name as a file-name part: 'Dead tree' → 'dead_tree'."""
    slug = re.sub(r"[^0-9a-z]+", "_", class_name.strip().lower()).strip("_")
    return slug or DEFAULT_CLASS


def taught_class_paths(params: dict[str, Any], untrained: bool, class_name: str) -> OutputPaths:
    """A teach run's paths; for a class other than trees `<stem>_<class>_similarity.tif`,
    `<stem>_taught_<class>.tif` and `<stem>_<class>_teach.json` (`<kind>_path` entries still win)."""
    paths = OutputPaths.for_params(params, untrained)
    slug = class_slug(class_name)
    if slug == DEFAULT_CLASS:
        return paths
    suffixes = {"similarity": f"_{slug}_similarity.tif", "taught_trees": f"_taught_{slug}.tif",
                "teach_record": f"_{slug}_teach.json"}
    renamed = {kind: path.with_name(path.name[: -len(SUFFIXES[kind])] + suffix)
               for kind, suffix in suffixes.items()
               if not params.get(f"{kind}_path") and (path := getattr(paths, kind)).name.endswith(SUFFIXES[kind])}
    return replace(paths, **renamed)
