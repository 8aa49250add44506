"""Evaluate a tree prediction against reference data; writes a CSV and an HTML report.

Runs without torch (numpy, scipy, GDAL, matplotlib): the Processing algorithm
calls it inside QGIS, the command line as `python -m treeseg_qgis evaluate`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path

import numpy as np
from osgeo import gdal

from ..atomic import write_atomically
from ..outputs import OutputPathError, check_output_folder, check_output_paths
from .core.errors import InputError, OutputError, cannot_write
from .core.evaluation import ReferenceObject, box_scores, cluster_scores, crown_scores, pixel_scores, union_mask
from .core.files import refuse_special_file
from .gis.raster import RasterGrid
from .gis.reference import is_raster, read_band, read_prediction, read_reference_objects

MAX_PICTURE_SIZE = 900
NO_REFERENCE_TREES = ("The reference has no trees in the evaluated area: every recall is undefined (n/a), and "
                      "precision only counts what was wrongly called a tree. Check the reference and the area.")

log = logging.getLogger("treeseg")


def evaluate(
    prediction: str,
    reference: str,
    out_dir: str,
    image: str | None = None,
    clusters: str | None = None,
    tree_class: int = 1,
    name: str | None = None,
) -> dict:
    """Scores of `prediction` against `reference` (see core/evaluation.py); also written to out_dir.

    `reference` is polygons, a CSV of pixel boxes, or a class raster (tree class
    `tree_class`; with `clusters`, a cluster raster, mIoU is computed too).
    """
    name = name or Path(prediction).stem
    folder = Path(out_dir)
    csv_path, html_path = folder / f"{name}_evaluation.csv", folder / f"{name}_evaluation.html"
    _check_paths([prediction, reference, *filter(None, [image, clusters])], [csv_path, html_path])
    mask, valid, grid, crowns = read_prediction(prediction, image)
    scores: dict = {"prediction": prediction, "reference": reference}
    if Path(reference).suffix.lower() != ".csv" and is_raster(reference):
        classes, class_valid = read_band(reference, grid)
        valid = valid & class_valid
        truth = classes == tree_class
        scores["pixel"] = pixel_scores(mask, truth, valid)
        if clusters:
            cluster_ids, cluster_valid = read_band(clusters, grid)
            scores["clusters"] = cluster_scores(cluster_ids, classes, valid & cluster_valid)
        outline = truth
    else:
        objects = read_reference_objects(reference, grid)
        scores.update(object_scores(mask, valid, objects, crowns))
        outline = union_mask(objects, grid.shape)
    if scores["pixel"]["tp"] + scores["pixel"]["fn"] == 0:
        scores["warning"] = NO_REFERENCE_TREES
        log.warning(NO_REFERENCE_TREES)
    rows = flat_scores(scores)
    with cannot_write(str(csv_path)):
        write_atomically(csv_path, _csv_text(rows))
    with cannot_write(str(html_path)):
        write_atomically(html_path, _html_report(name, rows, _picture(image, mask, outline, grid)))
    scores["outputs"] = {"csv": str(csv_path), "html": str(html_path)}
    return scores


def _check_paths(inputs: list[str], outputs: list[Path]) -> None:
    """Before any work: the output folder can be written, no output is an input (or a file GDAL reads for one,
    a VRT's source), and no input is a pipe or device."""
    files = []
    for path in inputs:
        refuse_special_file(path, "input")
        files.append(path)
        try:
            dataset = gdal.OpenEx(path)
        except RuntimeError:
            continue
        files += (dataset.GetFileList() or []) if dataset is not None else []
    try:
        check_output_folder(outputs[0].parent)
        check_output_paths(files, [str(path) for path in outputs])
    except OutputPathError as error:
        raise OutputError(str(error)) from None


def object_scores(mask: np.ndarray, valid: np.ndarray, objects: list[ReferenceObject],
                  crowns: np.ndarray | None = None) -> dict:
    """Pixel scores against the objects' union, the box measures and the crown matching (core/evaluation.py)."""
    return {
        "pixel": pixel_scores(mask, union_mask(objects, mask.shape), valid),
        "boxes": box_scores(mask, objects, valid),
        "crowns": crown_scores(mask & valid, objects, crowns=crowns),
    }


def flat_scores(scores: dict) -> dict[str, float | None]:
    """The numeric scores as one flat `group_measure` → value mapping (None: undefined, e.g. recall without
    reference trees)."""
    flat = {}
    for group in ("pixel", "boxes", "crowns", "clusters"):
        for key, value in scores.get(group, {}).items():
            if value is None or isinstance(value, (int, float)):
                flat[f"{group}_{key}"] = value
    return flat


def format_score(value: float | None) -> str:
    """'0.8123' for a float, the integer as is, 'n/a' for an undefined score."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _csv_text(rows: dict[str, float | None]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["measure", "value"])
    for key, value in rows.items():
        writer.writerow([key, format_score(value)])
    return buffer.getvalue()


def _picture(image: str | None, mask: np.ndarray, reference: np.ndarray, grid: RasterGrid) -> bytes:
    """PNG: the image (or grey), reference outlines in yellow, predicted trees in translucent green."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    step = max(1, int(np.ceil(max(grid.shape) / MAX_PICTURE_SIZE)))
    background = _image_rgb(image, grid, step) if image else np.full((*mask[::step, ::step].shape, 3), 0.6)
    figure = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3)
    small_mask, small_ref = mask[::step, ::step], reference[::step, ::step]
    for axis, title in zip(panels, ("Image", "Reference (yellow)", "Prediction (green)")):
        axis.imshow(background)
        axis.set_title(title)
        axis.set_axis_off()
    outlines = small_ref.any() and not small_ref.all()  # a contour needs both sides of the line
    if outlines:
        panels[1].contour(small_ref, levels=[0.5], colors="yellow", linewidths=1)
    overlay = np.zeros((*small_mask.shape, 4))
    overlay[small_mask] = (0.1, 0.9, 0.1, 0.55)
    panels[2].imshow(overlay)
    if outlines:
        panels[2].contour(small_ref, levels=[0.5], colors="yellow", linewidths=0.8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _image_rgb(image: str, grid: RasterGrid, step: int) -> np.ndarray:
    from .gis.raster import GdalRasterSource

    with GdalRasterSource(image) as source:
        if (source.width, source.height) != (grid.width, grid.height):
            raise InputError(f"The image {image} does not share the prediction's pixel grid.")
        rgb, _ = source.read_decimated(-(-grid.width // step), -(-grid.height // step))
    return rgb


def _html_report(name: str, rows: dict[str, float | None], picture: bytes) -> str:
    table = "\n".join(f"<tr><td>{html.escape(key)}</td><td>{format_score(value)}</td></tr>"
                      for key, value in rows.items())
    image = base64.b64encode(picture).decode("ascii")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>treeseg evaluation — {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 12px;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>treeseg evaluation — {html.escape(name)}</h1>"
        f"<table><tr><th>measure</th><th>value</th></tr>{table}</table>"
        f"<p><img alt='image, reference and prediction' src='data:image/png;base64,{image}'></p>"
        "</body></html>"
    )

