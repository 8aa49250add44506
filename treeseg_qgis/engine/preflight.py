"""A command's checks that need no model library (GDAL at most): the command line runs them before torch,
transformers and scikit-learn load, so a wrong path, number or file answers at once; the pipeline and the
survey run them again for every other caller."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from osgeo import gdal

from ..outputs import MODEL_SUFFIX, OutputPathError, check_output_file, check_output_paths
from .core.errors import InputError, OutputError
from .core.files import refuse_special_file
from .gis.raster import open_raster


def check_rasters_open(paths: Sequence[str]) -> None:
    """Each raster is a file GDAL opens as a raster with bands (a pipe or device refused before it is opened)."""
    for path in paths:
        refuse_special_file(path, "raster")
        open_raster(path)


def check_named_files(files: dict[str | None, str]) -> None:
    """The files a user named besides the rasters (path → what it is; None: not given) exist and are no pipe,
    socket or device."""
    for path, what in files.items():
        if path is None:
            continue
        refuse_special_file(path, what)
        if not Path(path).exists():
            raise InputError(f"The {what} {path} does not exist.")


def check_teach_options(threshold: float | None, cluster_model: str | None, classifier: str | None,
                        save_classifier: str | None) -> None:
    """The threshold and the taught-classifier options of a teach run fit together."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"The threshold is a score between 0 and 1, not {threshold}.")
    if (classifier or save_classifier) and not cluster_model:
        raise InputError("A taught classifier works on a survey's features: give the survey cluster model "
                         "(--cluster-model, from `fit`) it is taught and applied with.")
    if classifier and save_classifier:
        raise InputError("Apply a taught classifier or save one, not both in one run.")


def check_fit_paths(inputs: Sequence[str], out_path: str | Path) -> None:
    """Before any work: the cluster model file ends in .treeseg, its folder exists and is writable, and it is
    none of the inputs nor a file GDAL reads for them (a VRT's sources); a pipe or device input is refused."""
    output_check(check_output_file, str(out_path), MODEL_SUFFIX, "cluster model file")
    output_check(check_output_paths, raster_files(inputs), [str(out_path)])


def raster_files(inputs: Sequence[str]) -> list[str]:
    """The inputs and every file GDAL reads for them (a VRT's sources); a pipe or device is refused at once."""
    files = []
    for path in inputs:
        refuse_special_file(path, "raster")
        files.append(str(path))
        try:
            dataset = gdal.OpenEx(str(path), gdal.OF_RASTER)
        except RuntimeError:
            continue  # the raster's own run reports it
        files += (dataset.GetFileList() or []) if dataset is not None else []
    return files


def output_check(check: Callable[..., None], *args: object) -> None:
    """An output path check of outputs.py, `check(*args)`, its refusal as the user's OutputError."""
    try:
        check(*args)
    except OutputPathError as error:
        raise OutputError(str(error)) from None
