"""Predictions and reference data on one pixel grid, for evaluation.

A prediction is a tree-mask raster (1 = tree, nodata excluded), polygons with
an `is_tree` field, or crown polygons with a `crown_id` field (each crown an
instance), the polygons rasterized on the grid of an image. A reference is polygons
(crown outlines or boxes, any vector format OGR reads, reprojected to the grid's
CRS), a class raster on the same grid, or a CSV of pixel boxes
(`xmin,ymin,xmax,ymax[,label]`, pixel-corner coordinates).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from osgeo import gdal, ogr, osr

from ..core.errors import InputError
from ..core.evaluation import ReferenceObject, boxes_to_objects
from ..core.examples import CLASS_FIELD, Example, class_label
from ..core.files import refuse_special_file
from .raster import RasterGrid, open_read_only

MAX_EVALUATION_PIXELS = 200_000_000


def evaluation_grid(path: str) -> RasterGrid:
    """The pixel grid of the raster at `path`, refused above MAX_EVALUATION_PIXELS."""
    grid = RasterGrid.of(_open_raster(path))
    if grid.width * grid.height > MAX_EVALUATION_PIXELS:
        raise InputError(f"{path} is larger than {MAX_EVALUATION_PIXELS // 1_000_000} megapixels: "
                         "evaluate a clip of the area your reference covers.")
    return grid


def read_band(path: str, grid: RasterGrid) -> tuple[np.ndarray, np.ndarray]:
    """Band 1 of a raster on `grid` and its validity (mask band)."""
    dataset = _open_raster(path)
    if (dataset.RasterXSize, dataset.RasterYSize) != (grid.width, grid.height):
        raise InputError(f"{path} is {dataset.RasterXSize} × {dataset.RasterYSize} px, the prediction "
                         f"{grid.width} × {grid.height} px: they must share one grid.")
    band = dataset.GetRasterBand(1)
    return band.ReadAsArray(), band.GetMaskBand().ReadAsArray() > 0


def read_prediction(path: str, image: str | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, RasterGrid, np.ndarray | None]:
    """(tree mask, valid, grid, crown ids or None) of a tree raster, of `is_tree` polygons, or of
    crown polygons (`crown_id`), the polygons rasterized on the grid of `image`."""
    if is_raster(path):
        grid = evaluation_grid(path)
        values, valid = read_band(path, grid)
        return (values == 1) & valid, valid, grid, None
    if image is None:
        raise InputError("A polygon prediction needs an image (or raster) whose pixel grid to evaluate on.")
    grid = evaluation_grid(image)
    everything = np.ones(grid.shape, dtype=bool)
    if _has_field(path, "crown_id"):
        crowns = rasterize(path, grid, attribute="crown_id")
        return crowns > 0, everything, grid, crowns
    return rasterize(path, grid, where="is_tree = 1") > 0, everything, grid, None


def read_reference_objects(path: str, grid: RasterGrid) -> list[ReferenceObject]:
    """Reference crowns or boxes as objects on `grid`."""
    if Path(path).suffix.lower() == ".csv":
        return boxes_to_objects(_read_pixel_boxes(path), grid.shape)
    source = _open_vector(path)
    objects = []
    for _, geometry in _geometries_in_grid_crs(source.GetLayer(0), grid):
        item = _rasterize_geometry(geometry, grid)
        if item is not None:
            objects.append(item)
    return objects


def _geometries_in_grid_crs(layer: ogr.Layer, grid: RasterGrid) -> Iterator[tuple[ogr.Feature, ogr.Geometry]]:
    """Each feature with a geometry, and a copy of that geometry in the grid's CRS."""
    transform = _transform_to(layer.GetSpatialRef(), grid)
    for feature in layer:
        geometry = feature.GetGeometryRef()
        if geometry is None or geometry.IsEmpty():
            continue
        geometry = geometry.Clone()
        if transform is not None:
            geometry.Transform(transform)
        yield feature, geometry


def rasterize(path: str, grid: RasterGrid, where: str | None = None, attribute: str | None = None) -> np.ndarray:
    """The polygons of a vector file (optionally filtered) burnt as 1, or as the value of `attribute`."""
    target = grid.create("MEM", "", 1, gdal.GDT_Int32)
    source = _open_vector(path)
    layer = source.GetLayer(0)
    if where:
        layer.SetAttributeFilter(where)
    if attribute:
        gdal.RasterizeLayer(target, [1], layer, options=[f"ATTRIBUTE={attribute}"])
    else:
        gdal.RasterizeLayer(target, [1], layer, burn_values=[1])
    return target.GetRasterBand(1).ReadAsArray()


def _has_field(path: str, name: str) -> bool:
    source = _open_vector(path)
    definition = source.GetLayer(0).GetLayerDefn()
    return definition.GetFieldIndex(name) >= 0


def _rasterize_geometry(geometry: ogr.Geometry, grid: RasterGrid) -> ReferenceObject | None:
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    gt = grid.geotransform
    if gt[2] or gt[4]:
        raise InputError("Rotated rasters are not supported for evaluation: warp the raster north-up first.")
    cols = sorted(((xmin - gt[0]) / gt[1], (xmax - gt[0]) / gt[1]))
    rows = sorted(((ymax - gt[3]) / gt[5], (ymin - gt[3]) / gt[5]))
    c0, c1 = max(0, int(np.floor(cols[0]))), min(grid.width, int(np.ceil(cols[1])))
    r0, r1 = max(0, int(np.floor(rows[0]))), min(grid.height, int(np.ceil(rows[1])))
    if c1 <= c0 or r1 <= r0:
        return None
    window_gt = (gt[0] + c0 * gt[1], gt[1], 0.0, gt[3] + r0 * gt[5], 0.0, gt[5])
    target = RasterGrid(c1 - c0, r1 - r0, window_gt, grid.crs_wkt).create("MEM", "", 1, gdal.GDT_Byte)
    layer_source = ogr.GetDriverByName("Memory").CreateDataSource("")
    layer = layer_source.CreateLayer("object", geom_type=ogr.wkbUnknown)
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(geometry)
    layer.CreateFeature(feature)
    gdal.RasterizeLayer(target, [1], layer, burn_values=[1])
    mask = target.GetRasterBand(1).ReadAsArray().astype(bool)
    if not mask.any():
        return None
    return ReferenceObject(slice(r0, r1), slice(c0, c1), mask)


def _read_pixel_boxes(path: str) -> list[tuple[float, float, float, float]]:
    refuse_special_file(path, "reference")
    boxes = []
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                boxes.append((float(row["xmin"]), float(row["ymin"]), float(row["xmax"]), float(row["ymax"])))
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"{path} is not a CSV of pixel boxes with columns xmin,ymin,xmax,ymax: {error}") from error
    return boxes


def _transform_to(source_srs: osr.SpatialReference | None, grid: RasterGrid) -> osr.CoordinateTransformation | None:
    if source_srs is None or not grid.crs_wkt:
        return None
    source_srs = source_srs.Clone()
    target = osr.SpatialReference()
    target.ImportFromWkt(grid.crs_wkt)
    for srs in (source_srs, target):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if source_srs.IsSame(target):
        return None
    return osr.CoordinateTransformation(source_srs, target)


def is_raster(path: str) -> bool:
    """Whether GDAL opens `path` as a raster (a pipe or device is refused first)."""
    refuse_special_file(path, "file")
    try:
        return gdal.OpenEx(path, gdal.OF_RASTER) is not None
    except RuntimeError:
        return False


def _open_raster(path: str) -> gdal.Dataset:
    refuse_special_file(path, "raster")
    return open_read_only(path, "the raster")


def _open_vector(path: str) -> gdal.Dataset:
    refuse_special_file(path, "vector file")
    return open_read_only(path, "the vector file", kind=gdal.OF_VECTOR)


def read_examples(path: str, grid: RasterGrid) -> list[Example]:
    """Click-to-teach examples: points with a text `class` field (several classes; empty values skipped) or
    an `is_tree` field (any CRS, reprojected), or a CSV of pixel positions `col,row,class` or `col,row,is_tree`."""
    refuse_special_file(path, "examples file")
    if Path(path).suffix.lower() == ".csv":
        try:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows and CLASS_FIELD in rows[0]:
                return [Example(float(row["col"]), float(row["row"]), label=label)
                        for row in rows if (label := class_label(row[CLASS_FIELD]))]
            return [Example(float(row["col"]), float(row["row"]), _truthy(row["is_tree"])) for row in rows]
        except (OSError, KeyError, ValueError, UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"{path} is not a CSV of examples with columns col,row,is_tree (or col,row,class): "
                             f"{error}") from error
    source = _open_vector(path)
    layer = source.GetLayer(0)
    definition = layer.GetLayerDefn()
    by_class = definition.GetFieldIndex(CLASS_FIELD) >= 0
    if not by_class and definition.GetFieldIndex("is_tree") < 0:
        raise InputError(f"The example points in {path} need an is_tree field (1 = tree, 0 = not a tree) or a "
                         f"{CLASS_FIELD} field naming each point's class.")
    _check_has_a_crs(layer, path, grid)
    inverse = gdal.InvGeoTransform(grid.geotransform)
    examples = []
    for feature, geometry in _geometries_in_grid_crs(layer, grid):
        point = geometry.Centroid()
        col, row = gdal.ApplyGeoTransform(inverse, point.GetX(), point.GetY())
        if not by_class:
            examples.append(Example(col, row, _truthy(feature.GetField("is_tree"))))
        elif label := class_label(feature.GetField(CLASS_FIELD)):
            examples.append(Example(col, row, label=label))
    return examples


def _check_has_a_crs(layer: ogr.Layer, path: str, grid: RasterGrid) -> None:
    """Refuse points without a CRS (none, or a GeoPackage's "Undefined geographic/Cartesian SRS", srs_id 0/-1)
    on a raster that has one: their coordinates cannot be placed on it."""
    srs = layer.GetSpatialRef()
    undefined = srs is None or srs.IsLocal() or (srs.GetName() or "").startswith("Undefined ")
    if not grid.crs_wkt or not undefined:
        return
    raster = osr.SpatialReference()
    raster.ImportFromWkt(grid.crs_wkt)
    name = ":".join(filter(None, [raster.GetAuthorityName(None), raster.GetAuthorityCode(None)])) or raster.GetName()
    raise InputError(f"The example points in {path} have no CRS, and the raster has one ({name}): set the points' "
                     "CRS (in QGIS: Layer CRS, then save the layer) or use a CSV of col,row,is_tree pixel numbers.")


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "t", "y")
