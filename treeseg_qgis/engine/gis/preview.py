"""A PNG preview of a run: input image, clusters and trees side by side."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ...atomic import atomic_file
from ..core.errors import OutputError, cannot_write
from .raster import GdalRasterSource, open_read_only
from .writers import NODATA, TREE_COLOUR

PANEL_INCHES = 4.0
MIN_PANEL_PIXELS = 400
TITLE_INCHES = 0.7
CHARACTERS_PER_INCH = 11
DIM = 0.45
ELBOW_INCHES = (2.6, 2.0)
"""The elbow plot's size: the panel shows it about 260 px wide, so a point there is about a point on the screen."""
ELBOW_DPI = 200
ELBOW_POINTS = 8.5
PNG_OPTIONS = {"compress_level": 1}
"""zlib's fastest level: the same pixels, files about 5 % larger, encoded 2-4x faster (docs/BENCHMARKS.md)."""


def _decimated_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    factor = max(width / max_size, height / max_size, 1.0)
    return max(1, round(width / factor)), max(1, round(height / factor))


def _read_band(path: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Band 1 of `path` resampled to width x height, and its colour table as RGBA 0..1."""
    dataset = open_read_only(path, "the raster to preview", "Run the segmentation again.", OutputError)
    band = dataset.GetRasterBand(1)
    values = band.ReadAsArray(buf_xsize=width, buf_ysize=height)
    lookup = np.zeros((256, 4), dtype=np.float32)
    table = band.GetColorTable()
    if table is not None:
        for index in range(min(table.GetCount(), 256)):
            lookup[index] = np.array(table.GetColorEntry(index), dtype=np.float32) / 255.0
    return values, lookup


def write_preview(
    source: GdalRasterSource,
    clusters_path: str,
    trees_path: str,
    png_path: str,
    title: str,
    max_size: int = 1024,
) -> None:
    """Write a PNG with the input image, the clusters and the trees, each at most max_size."""
    width, height = _decimated_size(source.width, source.height, max_size)
    image, valid = source.read_decimated(width, height)
    clusters, cluster_lookup = _read_band(clusters_path, width, height)
    trees, _ = _read_band(trees_path, width, height)

    cluster_image = cluster_lookup[clusters]
    tree_image = image * DIM
    tree_image[trees == 1] = np.array(TREE_COLOUR[:3], dtype=np.float32) / 255.0
    tree_image[~valid & (trees == NODATA)] = 0.5 * DIM

    longest = max(width, height)
    panel_width = PANEL_INCHES * width / longest
    panel_height = PANEL_INCHES * height / longest
    figure_width = 3 * panel_width
    dpi = max(longest, MIN_PANEL_PIXELS) / PANEL_INCHES
    figure = Figure(figsize=(figure_width, panel_height + TITLE_INCHES), dpi=dpi)
    FigureCanvasAgg(figure)
    figure.suptitle(
        textwrap.fill(title, width=max(20, int(figure_width * CHARACTERS_PER_INCH))),
        fontsize=11,
        fontweight="bold",
        color="darkred",
    )
    panels = [("Input", image), ("Clusters", cluster_image), ("Trees", tree_image)]
    for index, (name, picture) in enumerate(panels):
        axes = figure.add_axes(
            (index / 3 + 0.005, 0.0, 1 / 3 - 0.01, panel_height / (panel_height + TITLE_INCHES))
        )
        axes.imshow(picture, interpolation="nearest")
        axes.set_title(name, fontsize=9, pad=3)
        axes.set_axis_off()

    with cannot_write(f"the preview '{png_path}'"), atomic_file(png_path) as partial:
        figure.savefig(partial, format="png", dpi=dpi, pil_kwargs=PNG_OPTIONS)


def write_elbow_plot(inertia_curve: dict[int, float], chosen: int, png_path: str) -> None:
    """The inertia curve of the automatic K search with the chosen K marked, as a PNG drawn for the panel: its
    texts keep their size in points at the width the panel shows it (`ELBOW_INCHES` wide, at `ELBOW_DPI` so the
    file itself is sharp)."""
    ks = sorted(inertia_curve)
    figure = Figure(figsize=ELBOW_INCHES, dpi=ELBOW_DPI)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(ks, [inertia_curve[k] for k in ks], "o-", color="#455a64", markersize=4)
    axis.plot([chosen], [inertia_curve[chosen]], "o", markersize=9, markerfacecolor="none",
              markeredgecolor="#2e7d32", markeredgewidth=2, label=f"K = {chosen}")
    axis.set_yscale("log")
    axis.set_xticks(ks)
    axis.tick_params(labelsize=ELBOW_POINTS)
    axis.set_xlabel("number of clusters K", fontsize=ELBOW_POINTS)
    axis.set_ylabel("inertia (log)", fontsize=ELBOW_POINTS)
    axis.set_title("Elbow of the inertia curve", fontsize=ELBOW_POINTS)
    axis.legend(loc="upper right", fontsize=ELBOW_POINTS)
    figure.tight_layout(pad=0.3)
    with cannot_write(png_path), atomic_file(png_path) as partial:
        figure.savefig(partial, format="png", pil_kwargs=PNG_OPTIONS)
