"""Individual tree crowns from the tree mask, window by window, as GeoPackage polygons.

Each window (with a halo as wide as the largest crown) is split by
core/crowns.py; a crown belongs to the window that holds its centre, so no
crown is written twice. Fields: `crown_id`, `cluster` (majority cluster id),
`area_m2`, `perimeter_m`, `diameter_m` (diameter of the circle of equal area),
`centroid_x`, `centroid_y` (in the raster's CRS). Without a CRS, raster units
are taken as metres and the metric fields are NULL.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from osgeo import gdal, ogr, osr

from ..core.crowns import CrownOptions, split_crowns
from ..core.errors import Cancelled, InputError
from .polygons import metric_measures, raster_crs, write_polygon_gpkg

BLOCK = 1024
METRES_PER_DEGREE = 111_320.0


def write_crowns(
    trees_path: str,
    clusters_path: str,
    gpkg_path: str,
    layer_name: str,
    options: CrownOptions | None = None,
    progress: Callable[[float], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    description: str = "",
) -> int:
    """Write one polygon per crown of the tree mask into `gpkg_path` (default options when None); return the
    crown count."""
    options = options or CrownOptions()
    report = progress or (lambda fraction: None)
    cancelled = is_cancelled or (lambda: False)
    try:
        trees = gdal.Open(trees_path)
        clusters = gdal.Open(clusters_path)
    except RuntimeError as error:
        raise InputError(f"Cannot open the tree mask or cluster raster: {error}. "
                         "Run the segmentation again.") from error
    srs = raster_crs(trees)
    pixel_m = _pixel_size_m(trees, srs)
    halo = int(math.ceil(options.max_crown_m / pixel_m))
    measure = metric_measures(srs, trees)

    def fill(output: gdal.Dataset, layer: ogr.Layer) -> int:
        for name, kind in (("crown_id", ogr.OFTInteger), ("cluster", ogr.OFTInteger), ("area_m2", ogr.OFTReal),
                           ("perimeter_m", ogr.OFTReal), ("diameter_m", ogr.OFTReal),
                           ("centroid_x", ogr.OFTReal), ("centroid_y", ogr.OFTReal)):
            layer.CreateField(ogr.FieldDefn(name, kind))
        windows = [(x, y) for y in range(0, trees.RasterYSize, BLOCK) for x in range(0, trees.RasterXSize, BLOCK)]
        count = 0
        output.StartTransaction()
        for index, (x, y) in enumerate(windows):
            if cancelled():
                raise Cancelled()
            count = _crowns_of_window(trees, clusters, layer, x, y, halo, options, pixel_m, measure, count)
            report((index + 1) / len(windows))
        output.CommitTransaction()
        return count

    return write_polygon_gpkg(gpkg_path, layer_name, srs, description, fill)


def _crowns_of_window(trees: gdal.Dataset, clusters: gdal.Dataset, layer: ogr.Layer, x: int, y: int, halo: int,
                      options: CrownOptions, pixel_m: float, measure, count: int) -> int:
    width, height = trees.RasterXSize, trees.RasterYSize
    x0, y0 = max(0, x - halo), max(0, y - halo)
    x1, y1 = min(width, x + BLOCK + halo), min(height, y + BLOCK + halo)
    mask = trees.GetRasterBand(1).ReadAsArray(x0, y0, x1 - x0, y1 - y0) == 1
    labels, centres = split_crowns(mask, options, pixel_m)
    if not len(centres):
        return count
    core = ((centres[:, 0] + y0 >= y) & (centres[:, 0] + y0 < y + BLOCK)
            & (centres[:, 1] + x0 >= x) & (centres[:, 1] + x0 < x + BLOCK))
    keep = np.zeros(len(centres) + 2, bool)
    keep[1:len(centres) + 1] = core
    labels = np.where(keep[labels], labels, 0).astype(np.int32)
    if not labels.any():
        return count
    cluster_ids = clusters.GetRasterBand(1).ReadAsArray(x0, y0, x1 - x0, y1 - y0)
    majority = _majority(labels, cluster_ids)
    gt = trees.GetGeoTransform()
    window = gdal.GetDriverByName("MEM").Create("", x1 - x0, y1 - y0, 1, gdal.GDT_Int32)
    window.SetGeoTransform((gt[0] + x0 * gt[1] + y0 * gt[2], gt[1], gt[2],
                            gt[3] + x0 * gt[4] + y0 * gt[5], gt[4], gt[5]))
    band = window.GetRasterBand(1)
    band.WriteArray(labels)
    memory = ogr.GetDriverByName("Memory").CreateDataSource("")
    shapes = memory.CreateLayer("crowns", geom_type=ogr.wkbPolygon)
    shapes.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
    gdal.Polygonize(band, band, shapes, 0, [])
    ids: dict[int, int] = {}
    for shape in shapes:
        label = shape.GetField("label")
        if label not in ids:
            count += 1
            ids[label] = count
        geometry = shape.GetGeometryRef()
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetGeometry(geometry)
        centroid = geometry.Centroid()
        feature.SetField("crown_id", ids[label])
        feature.SetField("cluster", int(majority.get(label, 255)))
        feature.SetField("centroid_x", centroid.GetX())
        feature.SetField("centroid_y", centroid.GetY())
        measures = measure(geometry)
        if measures is not None:
            area, perimeter = measures
            feature.SetField("area_m2", area)
            feature.SetField("perimeter_m", perimeter)
            feature.SetField("diameter_m", 2 * math.sqrt(area / math.pi))
        layer.CreateFeature(feature)
    return count


def _majority(labels: np.ndarray, cluster_ids: np.ndarray) -> dict[int, int]:
    """The most frequent cluster id under each crown label."""
    inside = labels > 0
    pairs = labels[inside].astype(np.int64) * 256 + cluster_ids[inside].astype(np.int64)
    values, counts = np.unique(pairs, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for value, frequency in zip(values.tolist(), counts.tolist()):
        label, cluster = divmod(value, 256)
        if frequency > best.get(label, (0, 0))[0]:
            best[label] = (frequency, cluster)
    return {label: cluster for label, (_, cluster) in best.items()}


def _pixel_size_m(dataset: gdal.Dataset, srs: osr.SpatialReference | None) -> float:
    gt = dataset.GetGeoTransform()
    size = math.hypot(gt[1], gt[4])
    if srs is None:
        return size
    if srs.IsGeographic():
        latitude = gt[3] + gt[5] * dataset.RasterYSize / 2
        return size * METRES_PER_DEGREE * max(math.cos(math.radians(latitude)), 0.01)
    return size * srs.GetLinearUnits()
