"""The raster the engine reads: the layer's own file, or a GDAL VRT that crops, masks and resamples it.

The engine only takes a file path, so an extent, a mask and a target resolution
are applied here, on the QGIS side, by `gdal.Warp` into a small VRT: nothing is
copied, the engine reads the original pixels through it. Pixels outside the
mask get alpha 0, which the engine treats as nodata.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeatureRequest,
    QgsFeatureSource,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingContext,
    QgsProcessingException,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
)

from ..outputs import raster_geotransform
from .compat import METRES, POLYGON_GEOMETRY

EXPORT_HINT = (
    "export it to a GeoTIFF first (Raster ▸ Conversion ▸ Translate, or right-click the layer ▸ "
    "Export ▸ Save As…) and run the algorithm on that file"
)
SNAP_TOLERANCE = 1e-6
UNSAFE_FILENAME_CHARACTERS = re.compile(r"[^\w.-]")


@dataclass(frozen=True)
class Bounds:
    """An axis-aligned rectangle in the raster's CRS."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @classmethod
    def of(cls, rectangle: QgsRectangle) -> Bounds:
        return cls(rectangle.xMinimum(), rectangle.yMinimum(), rectangle.xMaximum(), rectangle.yMaximum())

    def intersection(self, other: Bounds) -> Bounds | None:
        result = Bounds(max(self.xmin, other.xmin), max(self.ymin, other.ymin),
                        min(self.xmax, other.xmax), min(self.ymax, other.ymax))
        return result if result.xmin < result.xmax and result.ymin < result.ymax else None


@dataclass(frozen=True)
class RasterGrid:
    """The pixel grid of a raster file: its CRS, GDAL geotransform and size. Turns points into the pixel
    positions the engine reads, for the dock's clicks and Processing's example points alike."""

    crs: QgsCoordinateReferenceSystem
    geotransform: tuple[float, ...]
    width: int
    height: int

    @classmethod
    def of_file(cls, path: str) -> RasterGrid:
        """The grid of the raster (or VRT) at `path`, as QGIS shows it: one without a geotransform has pixels of
        1 × -1 from the origin, row 0 at the top. QgsProcessingException (one line) when GDAL cannot open it."""
        dataset = _gdal(f"Cannot open the raster {path}", gdal.Open, path)
        return cls(QgsCoordinateReferenceSystem.fromWkt(dataset.GetProjection()), raster_geotransform(dataset),
                   dataset.RasterXSize, dataset.RasterYSize)

    def pixel(self, point: QgsPointXY) -> tuple[float, float]:
        """(column, row) of a point in the grid's CRS, rotated grids too; row 0 is the top edge, whatever the
        sign of the pixel height."""
        inverse = gdal.InvGeoTransform(self.geotransform)
        column = inverse[0] + inverse[1] * point.x() + inverse[2] * point.y()
        row = inverse[3] + inverse[4] * point.x() + inverse[5] * point.y()
        return column, row

    def contains(self, column: float, row: float) -> bool:
        return 0 <= column < self.width and 0 <= row < self.height


def raster_file(layer: QgsRasterLayer) -> str:
    """The path GDAL opens for a file-based layer, a relative file made absolute against this process's working
    folder (the engine worker has its own); a clear error for web and other non-file layers."""
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"'{layer.name()}' is not a raster file (its data come from the '{layer.providerType()}' "
            f"provider). The treeseg engine reads files only: {EXPORT_HINT}."
        )
    return absolute_file(layer.source())


def absolute_file(path: str) -> str:
    """`path` made absolute against this process's working folder (where qgis_process was called from) when it
    names a relative local path; other sources (GDAL's /vsi…, connection strings) as they are."""
    if not path or os.path.isabs(path) or path.startswith("/vsi") or ":" in path:
        return path
    return os.path.abspath(path)


def prepare_input(
    layer: QgsRasterLayer,
    extent: QgsRectangle | None,
    mask: QgsFeatureSource | None,
    resolution_m: float,
    context: QgsProcessingContext,
    folder: Path,
) -> str:
    """The path the engine should read: the layer's file, or a VRT in `folder` when a crop,
    mask or resolution is asked for. `extent` must already be in the layer's CRS."""
    source = raster_file(layer)
    if extent is None and mask is None and resolution_m <= 0:
        return source
    dataset = _gdal(f"Cannot open the raster '{layer.name()}'", gdal.Open, source)
    grid = _Grid.of(dataset, layer.name())
    bounds = grid.bounds
    if extent is not None:
        bounds = _overlap(bounds, Bounds.of(extent), f"The extent does not overlap the raster '{layer.name()}'.")
    pixel_size = resolution_m * _metres_to_crs_units(layer.crs()) if resolution_m > 0 else None
    folder.mkdir(parents=True, exist_ok=True)
    stem = UNSAFE_FILENAME_CHARACTERS.sub("_", Path(source).stem)
    vrt = folder / f"{stem}_{uuid.uuid4().hex[:8]}.vrt"
    cutline = None
    try:
        if mask is not None:
            cutline, mask_bounds = _write_cutline(mask, layer.crs(), context, folder)
            bounds = _overlap(bounds, mask_bounds,
                              f"The mask polygons do not overlap the raster '{layer.name()}' (or the extent).")
        bounds, x_size, y_size, resampling = grid.output_grid(bounds, pixel_size)
        options = gdal.WarpOptions(
            format="VRT", outputBounds=(bounds.xmin, bounds.ymin, bounds.xmax, bounds.ymax),
            xRes=x_size, yRes=y_size, resampleAlg=resampling, dstAlpha=True,
            cutlineDSName=str(cutline) if cutline else None,
        )
        _gdal("Cannot prepare the input raster", gdal.Warp, str(vrt), dataset, options=options)
    finally:
        if cutline is not None:
            cutline.unlink(missing_ok=True)
    return str(vrt)


@dataclass(frozen=True)
class _Grid:
    """The source raster's north-up pixel grid."""

    x0: float
    y0: float
    pixel_width: float
    pixel_height: float
    columns: int
    rows: int

    @classmethod
    def of(cls, dataset: gdal.Dataset, name: str) -> _Grid:
        x0, pixel_width, row_rotation, y0, column_rotation, pixel_height = dataset.GetGeoTransform()
        if row_rotation or column_rotation or pixel_height >= 0:
            raise QgsProcessingException(
                f"'{name}' is not a north-up georeferenced raster; an extent, mask or resolution needs one. "
                "Warp it first (Raster ▸ Projections ▸ Warp) or run without them."
            )
        return cls(x0, y0, pixel_width, -pixel_height, dataset.RasterXSize, dataset.RasterYSize)

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.x0, self.y0 - self.rows * self.pixel_height,
                      self.x0 + self.columns * self.pixel_width, self.y0)

    def snap(self, bounds: Bounds) -> Bounds:
        """`bounds` grown outwards to whole source pixels."""
        left = math.floor((bounds.xmin - self.x0) / self.pixel_width + SNAP_TOLERANCE)
        right = math.ceil((bounds.xmax - self.x0) / self.pixel_width - SNAP_TOLERANCE)
        top = math.floor((self.y0 - bounds.ymax) / self.pixel_height + SNAP_TOLERANCE)
        bottom = math.ceil((self.y0 - bounds.ymin) / self.pixel_height - SNAP_TOLERANCE)
        return Bounds(self.x0 + left * self.pixel_width, self.y0 - bottom * self.pixel_height,
                      self.x0 + right * self.pixel_width, self.y0 - top * self.pixel_height)

    def output_grid(self, bounds: Bounds, pixel_size: float | None) -> tuple[Bounds, float, float, str]:
        """Bounds, pixel width and height and resampling of the VRT: whole source pixels at the native
        resolution, or square pixels of `pixel_size` from the snapped top-left corner."""
        bounds = self.snap(bounds)
        if pixel_size is None:
            return bounds, self.pixel_width, self.pixel_height, "near"
        columns = math.ceil((bounds.xmax - bounds.xmin) / pixel_size - SNAP_TOLERANCE)
        rows = math.ceil((bounds.ymax - bounds.ymin) / pixel_size - SNAP_TOLERANCE)
        resized = Bounds(bounds.xmin, bounds.ymax - rows * pixel_size, bounds.xmin + columns * pixel_size, bounds.ymax)
        return resized, pixel_size, pixel_size, "average" if pixel_size > self.pixel_width else "bilinear"


def _gdal(failure: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call GDAL whether or not its exceptions are enabled (QGIS leaves them off); failure → QgsProcessingException."""
    try:
        result = function(*args, **kwargs)
    except RuntimeError as error:
        raise QgsProcessingException(f"{failure}: {error}") from error
    if result is None:
        raise QgsProcessingException(f"{failure}: {gdal.GetLastErrorMsg()}")
    return result


def _overlap(bounds: Bounds, other: Bounds, message: str) -> Bounds:
    result = bounds.intersection(other)
    if result is None:
        raise QgsProcessingException(message)
    return result


def _metres_to_crs_units(crs: QgsCoordinateReferenceSystem) -> float:
    if crs.isGeographic():
        raise QgsProcessingException(
            f"The resolution is in metres, but the raster's CRS ({crs.authid()}) is in degrees. "
            "Reproject the raster to a projected CRS first (Raster ▸ Projections ▸ Warp) or leave "
            "the resolution at 0."
        )
    return QgsUnitTypes.fromUnitToUnitFactor(METRES, crs.mapUnits())


def _write_cutline(mask: QgsFeatureSource, crs: QgsCoordinateReferenceSystem, context: QgsProcessingContext,
                   folder: Path) -> tuple[Path, Bounds]:
    """The mask's polygons in the raster's CRS as a temporary GeoPackage, and their bounds."""
    request = QgsFeatureRequest().setDestinationCrs(crs, context.transformContext())
    request.setNoAttributes()
    path = folder / f"mask_{uuid.uuid4().hex[:8]}.gpkg"
    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs.toWkt())
    data_source = _gdal("Cannot write the mask for GDAL", ogr.GetDriverByName("GPKG").CreateDataSource, str(path))
    layer = data_source.CreateLayer("mask", srs, ogr.wkbMultiPolygon)
    extent: QgsRectangle | None = None
    for feature in mask.getFeatures(request):
        geometry = _valid_polygons(feature.geometry())
        if geometry is None:
            continue
        row = ogr.Feature(layer.GetLayerDefn())
        row.SetGeometry(ogr.CreateGeometryFromWkb(bytes(geometry.asWkb())))
        layer.CreateFeature(row)
        if extent is None:
            extent = geometry.boundingBox()
        else:
            extent.combineExtentWith(geometry.boundingBox())
    data_source = None
    if extent is None or extent.isEmpty():
        path.unlink(missing_ok=True)
        raise QgsProcessingException("The mask layer has no polygons: choose a polygon layer with features.")
    return path, Bounds.of(extent)


def _valid_polygons(geometry: QgsGeometry) -> QgsGeometry | None:
    if geometry.isNull() or geometry.isEmpty():
        return None
    if not geometry.isGeosValid():
        geometry = geometry.makeValid()
        geometry.convertGeometryCollectionToSubclass(POLYGON_GEOMETRY)
    geometry.convertToMultiType()
    return geometry if geometry.type() == POLYGON_GEOMETRY and not geometry.isEmpty() else None
