"""The outputs of teaching several classes: a paletted class raster whose categories are the class names
(0 = unsure, 255 = nodata), one probability band per class, and polygons with a `class` field."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from osgeo import gdal, ogr, osr

from ...atomic import partial_path
from ...outputs import CLASS_COLOURS
from ..core.errors import OutputError
from .raster import RasterGrid
from .writers import NODATA, LabelRasterWriter

UNSURE = 0
UNSURE_NAME = "unsure"
PROBABILITY_NODATA = -1.0
UNSURE_COLOUR = (255, 255, 255, 0)


def class_categories(names: Sequence[str]) -> list[str]:
    """Category names by value: 0 unsure, 1.. the classes, 255 nodata."""
    categories = [UNSURE_NAME, *names] + [""] * (NODATA - len(names) - 1) + ["nodata"]
    return categories


def class_palette(count: int) -> dict[int, tuple[int, int, int, int]]:
    """A colour per class value (1..count), unsure transparent."""
    return {UNSURE: UNSURE_COLOUR, **{value: (*CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)], 255)
                                      for value in range(1, count + 1)}}


class ClassRasterWriter(LabelRasterWriter):
    """Writes the class raster (Byte, paletted, named categories) and the class probabilities (Float32, one
    band per class, named) window by window; as LabelRasterWriter, under temporary names until `close`."""

    def __init__(self, classes_path: str, probabilities_path: str, grid: RasterGrid, names: Sequence[str],
                 metadata: dict[str, str]) -> None:
        self._final_paths = [classes_path, probabilities_path]
        self._partial_paths = [partial_path(classes_path), partial_path(probabilities_path)]
        self._datasets = []
        try:
            self._datasets.append(self._create(self._partial_paths[0], classes_path, grid, class_palette(len(names)),
                                               class_categories(names), metadata))
            probabilities = self._create(self._partial_paths[1], probabilities_path, grid, None, None, metadata,
                                         gdal.GDT_Float32, PROBABILITY_NODATA, len(names))
            self._datasets.append(probabilities)
            for number, name in enumerate(names, start=1):
                probabilities.GetRasterBand(number).SetDescription(name)
        except BaseException:
            self.abort()
            raise

    def write(self, x: int, y: int, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """One window: (K, h, w) probabilities and the (h, w) class values."""
        try:
            self._datasets[0].GetRasterBand(1).WriteArray(labels.astype(np.uint8), xoff=x, yoff=y)
            for index, band in enumerate(probabilities):
                self._datasets[1].GetRasterBand(index + 1).WriteArray(band.astype(np.float32), xoff=x, yoff=y)
        except RuntimeError as error:
            raise OutputError(f"Writing '{self._final_paths[0]}' failed: {error}. Check the free disk space and "
                              "that the folder is still writable.") from error


def write_class_polygons(classes_path: str, polygons_path: str, names: Sequence[str]) -> int:
    """Polygons of the class raster's classes (unsure and nodata left out) with `class_id` and `class`
    fields, as a GeoPackage; returns how many."""
    raster = gdal.Open(classes_path)
    band = raster.GetRasterBand(1)
    srs = osr.SpatialReference()
    if raster.GetProjection():
        srs.ImportFromWkt(raster.GetProjection())
    try:
        source = ogr.GetDriverByName("GPKG").CreateDataSource(polygons_path)
        layer = source.CreateLayer("classes", srs if raster.GetProjection() else None, ogr.wkbPolygon)
        layer.CreateField(ogr.FieldDefn("class_id", ogr.OFTInteger))
        name_field = ogr.FieldDefn("class", ogr.OFTString)
        layer.CreateField(name_field)
        gdal.Polygonize(band, band.GetMaskBand(), layer, 0, [])
        layer.StartTransaction()
        count = 0
        for feature in list(layer):
            value = feature.GetField("class_id")
            if not 1 <= value <= len(names):
                layer.DeleteFeature(feature.GetFID())
                continue
            feature.SetField("class", names[value - 1])
            layer.SetFeature(feature)
            count += 1
        layer.CommitTransaction()
        source = None
    except RuntimeError as error:
        raise OutputError(f"Cannot write the class polygons '{polygons_path}': {error}.") from error
    return count
