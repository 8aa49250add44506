"""The run panel's parameters made ready to run: read from a local raster file, validated, with an output stem
that overwrites no earlier run and output paths that touch no input; InputProblem (for the user) otherwise."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from qgis.core import QgsProject, QgsProviderRegistry, QgsRasterLayer

from ...outputs import OutputPathError, OutputPaths, check_run_paths
from ...params import SegmentationParams

DEFAULTS = SegmentationParams(input_path="", output_dir="")
"""What a run uses for everything the panel leaves at its default."""
EXPORT_HINT = ("export it to a GeoTIFF first (right-click the layer ▸ Export ▸ Save As…) and run TreeSeg "
               "on that file")


class InputProblem(ValueError):
    """The panel's settings cannot make a run; the message tells the user what to change."""


def layer_file(layer: QgsRasterLayer) -> str:
    """The GDAL source of a raster stored in a local file; InputProblem for web and database layers."""
    if layer.providerType() != "gdal":
        where = f"its data come from the '{layer.providerType()}' provider"
    elif not Path(_gdal_path(layer.source())).is_file():
        where = f"{layer.source()} is not a local file"
    else:
        return layer.source()
    raise InputProblem(f"'{layer.name()}' cannot be read by TreeSeg ({where}): {EXPORT_HINT}.")


def _gdal_path(source: str) -> str:
    """The file path in a GDAL layer source (which may add options such as a sub-dataset); '' when it has none."""
    return QgsProviderRegistry.instance().decodeUri("gdal", source).get("path") or ""


def free_output_stem(folder: Path, stem: str) -> str:
    """`stem`, or `stem_2`, `stem_3`… so that a run never overwrites the outputs of an earlier one."""
    candidate, number = stem, 1
    while any(path.exists() for untrained in (False, True) for path in OutputPaths.for_params(
            SegmentationParams("", str(folder), output_stem=candidate), untrained).all()):
        number += 1
        candidate = f"{stem}_{number}"
    return candidate


def default_output_folder() -> str:
    """A 'treeseg' folder in the project's home, or in the system's temporary folder."""
    home = QgsProject.instance().homePath()
    return str(Path(home or tempfile.gettempdir()) / "treeseg")


def ready_params(params: SegmentationParams, source: str) -> SegmentationParams:
    """`params` validated and named after `source` (the layer's file) with the first free output stem; raises
    ParameterError, or InputProblem when an output would land on `source` or on another output."""
    params.validate()
    stem = Path(_gdal_path(source) or source).stem
    params = replace(params, output_stem=free_output_stem(Path(params.output_dir), stem))
    try:
        check_run_paths(params, inputs=(source,))
    except OutputPathError as error:
        raise InputProblem(str(error)) from None
    return params
