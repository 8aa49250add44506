"""Writing the cluster raster and the tree-mask raster window by window."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from osgeo import gdal

from ...atomic import atomic_file, partial_path
from ..core.errors import InputError, OutputError
from .raster import RasterGrid

NODATA = 255
CREATION_OPTIONS = ["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]

TREE_COLOURS = ((34, 139, 34), (0, 200, 83), (107, 142, 35), (46, 204, 113), (0, 100, 0), (154, 205, 50),
                (60, 179, 113), (85, 107, 47), (124, 252, 0), (32, 178, 120))
OTHER_COLOURS = ((160, 160, 160), (139, 90, 43), (70, 130, 180), (128, 0, 128), (210, 180, 140), (90, 90, 90),
                 (205, 133, 63), (30, 60, 150), (186, 85, 211), (200, 200, 200), (101, 67, 33), (100, 149, 237),
                 (75, 0, 130), (230, 190, 160), (50, 50, 60))
NOT_TREE_COLOUR = (200, 200, 200, 0)
TREE_COLOUR = (34, 139, 34, 255)


def cluster_colours(n_clusters: int, tree_clusters: Sequence[int]) -> list[tuple[int, int, int]]:
    """RGB colour of each cluster id: shades of green for trees, other hues otherwise."""
    trees = set(tree_clusters)
    colours = []
    tree_index = other_index = 0
    for cluster in range(n_clusters):
        if cluster in trees:
            colours.append(TREE_COLOURS[tree_index % len(TREE_COLOURS)])
            tree_index += 1
        else:
            colours.append(OTHER_COLOURS[other_index % len(OTHER_COLOURS)])
            other_index += 1
    return colours


def _colour_table(entries: dict[int, tuple[int, int, int, int]]) -> gdal.ColorTable:
    table = gdal.ColorTable()
    for index in range(256):
        table.SetColorEntry(index, entries.get(index, (0, 0, 0, 0)))
    return table


TREE_NAMES = ["not tree", "tree"] + [""] * 253 + ["nodata"]
TREE_STYLE = ({0: NOT_TREE_COLOUR, 1: TREE_COLOUR}, TREE_NAMES)


class LabelRasterWriter:
    """Writes the cluster raster and the tree-mask raster window by window.

    Both are paletted Byte GeoTIFFs (tiled, DEFLATE) with nodata 255. They are
    written under a temporary name (`<name>.partial.tif`) in the output folder and
    renamed to their final names by `close`, so an unfinished file never carries a
    final name. Used as a context manager, the writer closes on success and aborts
    (removes the temporary files) on an exception.
    """

    def __init__(
        self,
        clusters_path: str,
        trees_path: str,
        grid: RasterGrid,
        n_clusters: int,
        tree_clusters: Sequence[int],
        metadata: dict[str, str],
    ) -> None:
        unknown = sorted(set(tree_clusters) - set(range(n_clusters)))
        if unknown:
            raise InputError(
                f"Tree clusters {unknown} do not exist: cluster ids go from 0 to {n_clusters - 1}."
            )
        self._final_paths = [clusters_path, trees_path]
        self._partial_paths = [partial_path(clusters_path), partial_path(trees_path)]
        self._datasets: list[gdal.Dataset] = []
        self._dtypes = [np.uint8, np.uint8]
        colours = cluster_colours(n_clusters, tree_clusters)
        trees = set(tree_clusters)
        cluster_palette = {index: (*colour, 255) for index, colour in enumerate(colours)}
        cluster_names = [""] * 256
        for cluster in range(n_clusters):
            cluster_names[cluster] = f"Cluster {cluster} — tree" if cluster in trees else f"Cluster {cluster}"
        cluster_names[NODATA] = "nodata"
        layers = [(cluster_palette, cluster_names), TREE_STYLE]
        try:
            for path, final_path, (palette, names) in zip(self._partial_paths, self._final_paths, layers):
                self._datasets.append(self._create(path, final_path, grid, palette, names, metadata))
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _create(
        path: str,
        final_path: str,
        grid: RasterGrid,
        palette: dict[int, tuple[int, int, int, int]] | None,
        names: list[str] | None,
        metadata: dict[str, str],
        data_type: int = gdal.GDT_Byte,
        nodata: float = NODATA,
        bands: int = 1,
    ) -> gdal.Dataset:
        folder = os.path.dirname(os.path.abspath(final_path))
        if not os.path.isdir(folder):
            raise OutputError(
                f"The output folder '{folder}' does not exist. Create it or choose another "
                f"path for '{os.path.basename(final_path)}'."
            )
        try:
            dataset = grid.create("GTiff", path, bands, data_type,
                                  CREATION_OPTIONS if bands == 1 else [*CREATION_OPTIONS, "INTERLEAVE=BAND"])
        except RuntimeError as error:
            raise OutputError(
                f"Cannot create '{final_path}': {error}. Check that the folder is writable "
                "and the disk has space, or choose another output path."
            ) from error
        dataset.SetMetadata({str(key): str(value) for key, value in metadata.items()})
        for number in range(1, bands + 1):
            dataset.GetRasterBand(number).SetNoDataValue(nodata)
        band = dataset.GetRasterBand(1)
        if palette is not None:
            band.SetColorTable(_colour_table(palette))
            band.SetColorInterpretation(gdal.GCI_PaletteIndex)
        if names is not None:
            band.SetCategoryNames(names)
        return dataset

    def write(self, x: int, y: int, labels: np.ndarray, trees: np.ndarray) -> None:
        """Write one window of cluster ids and tree flags (uint8, 255 = nodata) at (x, y)."""
        if labels.shape != trees.shape or labels.ndim != 2:
            raise ValueError(f"labels {labels.shape} and trees {trees.shape} must be 2-D of the same shape")
        try:
            for dataset, dtype, array in zip(self._datasets, self._dtypes, (labels, trees)):
                dataset.GetRasterBand(1).WriteArray(np.asarray(array, dtype=dtype), xoff=x, yoff=y)
        except RuntimeError as error:
            raise self._write_failed(error) from error

    def _write_failed(self, error: RuntimeError) -> OutputError:
        return OutputError(f"Writing '{self._final_paths[0]}' failed: {error}. "
                           "Check the free disk space and that the folder is still writable.")

    def close(self) -> None:
        """Flush both rasters and give them their final names."""
        try:
            for dataset in self._datasets:
                dataset.FlushCache()
            self._datasets = []  # closes the files: on a full disk GDAL raises here
        except RuntimeError as error:
            self.abort()
            raise self._write_failed(error) from error
        for partial, final in zip(self._partial_paths, self._final_paths):
            try:
                _replace_with_sidecar(partial, final)
            except OSError as error:
                self.abort()
                raise OutputError(
                    f"Cannot replace '{final}': {error.strerror}. Close it in QGIS or any "
                    "other program that has it open, or choose another output path."
                ) from error

    def abort(self) -> None:
        """Remove the temporary files; safe to call more than once."""
        try:
            self._datasets = []
        except RuntimeError:
            pass  # closing a half-written raster on a full disk fails; the file goes below
        for partial in self._partial_paths:
            for path in (partial, partial + ".aux.xml"):
                if os.path.exists(path):
                    os.remove(path)

    def __enter__(self) -> LabelRasterWriter:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ScoreRasterWriter(LabelRasterWriter):
    """Writes the click-to-teach scores (Float32, nodata -1) and the tree mask window by window."""

    def __init__(self, scores_path: str, trees_path: str, grid: RasterGrid, metadata: dict[str, str]) -> None:
        self._final_paths = [scores_path, trees_path]
        self._partial_paths = [partial_path(scores_path), partial_path(trees_path)]
        self._datasets = []
        self._dtypes = [np.float32, np.uint8]
        try:
            self._datasets.append(self._create(self._partial_paths[0], scores_path, grid, None, None, metadata,
                                               gdal.GDT_Float32, -1.0))
            self._datasets.append(self._create(self._partial_paths[1], trees_path, grid, *TREE_STYLE, metadata))
        except BaseException:
            self.abort()
            raise


class HeightRasterWriter(LabelRasterWriter):
    """Writes a canopy-height raster (Float32 metres, nodata -1) window by window."""

    def __init__(self, path: str, grid: RasterGrid, metadata: dict[str, str]) -> None:
        self._final_paths = [path]
        self._partial_paths = [partial_path(path)]
        self._datasets = []
        self._dtypes = [np.float32]
        self._datasets.append(self._create(self._partial_paths[0], path, grid, None, None, metadata,
                                           gdal.GDT_Float32, -1.0))

    def write_heights(self, x: int, y: int, heights: np.ndarray) -> None:
        """Write one window of heights in metres."""
        try:
            self._datasets[0].GetRasterBand(1).WriteArray(np.asarray(heights, dtype=np.float32), xoff=x, yoff=y)
        except RuntimeError as error:
            raise OutputError(f"Writing '{self._final_paths[0]}' failed: {error}. "
                              "Check the free disk space and that the folder is still writable.") from error


def _replace_with_sidecar(partial: str, final: str) -> None:
    """Rename `partial` (and its .aux.xml, if GDAL wrote one) to `final`, raster last."""
    if os.path.exists(partial + ".aux.xml"):
        os.replace(partial + ".aux.xml", final + ".aux.xml")
    elif os.path.exists(final + ".aux.xml"):
        os.remove(final + ".aux.xml")
    os.replace(partial, final)


def write_rgb_blocks(path: str, grid: RasterGrid, blocks: Iterable[tuple[int, int, np.ndarray]],
                     metadata: dict[str, str]) -> None:
    """An RGB Byte GeoTIFF (0 = nodata) from (row, col, (h, w, 3) uint8) blocks, written atomically."""
    with atomic_file(path) as partial:
        try:
            dataset = grid.create("GTiff", partial, 3, gdal.GDT_Byte, [*CREATION_OPTIONS, "PHOTOMETRIC=RGB"])
        except RuntimeError as error:
            raise OutputError(f"Cannot create '{path}': {error}. Choose a folder you can write to.") from error
        try:
            dataset.SetMetadata(metadata)
            for band in range(3):
                dataset.GetRasterBand(band + 1).SetNoDataValue(0)
            for row, col, image in blocks:
                for band in range(3):
                    dataset.GetRasterBand(band + 1).WriteArray(image[..., band], col, row)
            dataset.FlushCache()
        finally:
            dataset = None
