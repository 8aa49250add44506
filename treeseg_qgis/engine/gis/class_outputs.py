"""The outputs of teaching several classes: a paletted class raster whose categories are the class names
(0 = unsure, 255 = nodata), one probability band per class, and polygons with a `class` field."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from osgeo import gdal, ogr, osr

from ...outputs import CLASS_COLOURS
from ..core.errors import OutputError
from .writers import CREATION_OPTIONS, NODATA, _colour_table

gdal.UseExceptions()
ogr.UseExceptions()

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


class ClassRasterWriter:
    """Writes the class raster (Byte, paletted, named categories) and the class probabilities (Float32, one
    band per class, named) window by window; `abort` removes both."""

    def __init__(self, classes_path: str, probabilities_path: str, width: int, height: int, crs_wkt: str,
                 geotransform: Sequence[float], names: Sequence[str], metadata: dict[str, str]) -> None:
        self.paths = [classes_path, probabilities_path]
        self._datasets: list[gdal.Dataset] = []
        try:
            driver = gdal.GetDriverByName("GTiff")
            classes = driver.Create(classes_path, width, height, 1, gdal.GDT_Byte, options=CREATION_OPTIONS)
            self._datasets.append(classes)
            probabilities = driver.Create(probabilities_path, width, height, len(names), gdal.GDT_Float32,
                                          options=[*CREATION_OPTIONS, "INTERLEAVE=BAND"])
            self._datasets.append(probabilities)
            for dataset in self._datasets:
                dataset.SetGeoTransform([float(v) for v in geotransform])
                if crs_wkt:
                    dataset.SetProjection(crs_wkt)
                dataset.SetMetadata({str(k): str(v) for k, v in metadata.items()})
            band = classes.GetRasterBand(1)
            band.SetNoDataValue(NODATA)
            band.SetColorTable(_colour_table(class_palette(len(names))))
            band.SetColorInterpretation(gdal.GCI_PaletteIndex)
            band.SetCategoryNames(class_categories(names))
            for index, name in enumerate(names):
                band = probabilities.GetRasterBand(index + 1)
                band.SetNoDataValue(PROBABILITY_NODATA)
                band.SetDescription(name)
        except RuntimeError as error:
            self.abort()
            raise OutputError(f"Cannot create '{classes_path}': {error}. Check that the folder is writable and "
                              "the disk has space.") from error

    def write(self, x: int, y: int, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """One window: (K, h, w) probabilities and the (h, w) class values."""
        try:
            self._datasets[0].GetRasterBand(1).WriteArray(labels.astype(np.uint8), xoff=x, yoff=y)
            for index, band in enumerate(probabilities):
                self._datasets[1].GetRasterBand(index + 1).WriteArray(band.astype(np.float32), xoff=x, yoff=y)
        except RuntimeError as error:
            raise OutputError(f"Writing '{self.paths[0]}' failed: {error}. Check the free disk space.") from error

    def close(self) -> None:
        try:
            for dataset in self._datasets:
                dataset.FlushCache()
            self._datasets = []
        except RuntimeError as error:
            self.abort()
            raise OutputError(f"Writing '{self.paths[0]}' failed: {error}. Check the free disk space.") from error

    def abort(self) -> None:
        """Close and remove both files; safe to call more than once."""
        self._datasets = []
        for path in self.paths:
            for leftover in (path, path + ".aux.xml"):
                if os.path.exists(leftover):
                    os.remove(leftover)


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
