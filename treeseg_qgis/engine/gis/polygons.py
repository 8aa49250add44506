"""Turning the cluster raster into a GeoPackage of polygons with useful attributes."""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Callable

import numpy as np
from osgeo import gdal, ogr, osr

from ...atomic import partial_path
from ..core.errors import Cancelled, OutputError
from ..core.heap import padded_heap
from .raster import open_read_only
from .seams import SeamJoins, join_pieces, polygon_rings, polygon_wkb, runs_on_line

POLYGONIZE_SHARE = 0.8
STRIPS_SHARE = 0.75
CHECK_EVERY = 1000
STRIP_PIXELS = 8_000_000
SQLITE_SIDECARS = ("-journal", "-wal", "-shm")
SeamRuns = dict[int, list[tuple[int, list[tuple[float, float]]]]]


def polygonize_clusters(
    clusters_path: str,
    gpkg_path: str,
    tree_clusters: Sequence[int],
    layer_name: str,
    progress: Callable[[float], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    description: str = "",
    strip_pixels: int = STRIP_PIXELS,
) -> int:
    """Write one polygon per 4-connected region of equal cluster id; return the count.

    The GeoPackage (replaced when it exists) gets one polygon layer in the raster's
    CRS with the fields `cluster`, `is_tree` (boolean) and `area_m2`. Nodata pixels
    make no polygons. `area_m2` is exact in a projected CRS, computed in a Lambert
    azimuthal equal-area projection centred on the raster in a geographic CRS, and
    NULL when the raster has no CRS. The file is written under a temporary name
    and renamed when complete; on cancellation (`Cancelled`) or failure nothing is
    left behind. Large north-up rasters are polygonized in strips of about
    `strip_pixels` pixels, with the polygons that cross a seam merged again, so
    memory does not grow with the raster's height.
    """
    report = progress or (lambda fraction: None)
    cancelled = is_cancelled or (lambda: False)
    raster = open_read_only(clusters_path, "the cluster raster", "Run the segmentation again to recreate it.")
    srs = raster_crs(raster)
    measure = metric_measures(srs, raster)
    band = raster.GetRasterBand(1)

    def fill(output: gdal.Dataset, layer: ogr.Layer) -> int:
        layer.CreateField(ogr.FieldDefn("cluster", ogr.OFTInteger))
        is_tree_field = ogr.FieldDefn("is_tree", ogr.OFTInteger)
        is_tree_field.SetSubType(ogr.OFSTBoolean)
        layer.CreateField(is_tree_field)
        layer.CreateField(ogr.FieldDefn("area_m2", ogr.OFTReal))

        def polygonize_progress(fraction: float, message: str, data: object) -> int:
            if cancelled():
                return 0
            report(min(fraction, 1.0) * POLYGONIZE_SHARE)
            return 1

        output.StartTransaction()
        try:
            with padded_heap():
                rows = _strip_rows(raster, strip_pixels)
                if rows < raster.RasterYSize:
                    _polygonize_in_strips(output, layer, raster, rows, report, cancelled)
                else:
                    gdal.Polygonize(band, band.GetMaskBand(), layer, 0, [], callback=polygonize_progress)
        except RuntimeError as error:
            if cancelled():
                raise Cancelled() from error
            raise OutputError(
                f"Making polygons for '{gpkg_path}' failed: {error}. "
                "Check the free disk space and that the folder is still writable."
            ) from error
        output.CommitTransaction()
        if not _fill_attributes_in_sql(output, layer.GetName(), tree_clusters, srs):
            _fill_attributes(output, layer, set(tree_clusters), measure, report, cancelled)
        return layer.GetFeatureCount()

    count = write_polygon_gpkg(gpkg_path, layer_name, srs, description, fill)
    report(1.0)
    return count


def write_polygon_gpkg(gpkg_path: str, layer_name: str, srs: osr.SpatialReference | None, description: str,
                       fill: Callable[[gdal.Dataset, ogr.Layer], int]) -> int:
    """Make a GeoPackage with one empty polygon layer under a temporary name, let `fill` add its fields and
    features, then rename it to `gpkg_path` (replaced when it exists); return what `fill` returns. On any
    failure, cancellation included, nothing is left behind."""
    temporary = partial_path(gpkg_path)
    remove_gpkg(temporary)
    try:
        output = gdal.GetDriverByName("GPKG").Create(temporary, 0, 0, 0, gdal.GDT_Unknown)
    except RuntimeError as error:
        raise OutputError(
            f"Cannot create '{gpkg_path}': {str(error) or 'GDAL gave no reason, the disk may be full'}. "
            "Check the free disk space and that the folder exists and is "
            "writable, or choose another output path."
        ) from error
    try:
        layer = output.CreateLayer(layer_name, srs, ogr.wkbPolygon, options=[f"DESCRIPTION={description}"])
        count = fill(output, layer)
        layer = None
        output = None
        replace_gpkg(temporary, gpkg_path)
        return count
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the frames of `fill` hold the dataset open
        layer = None
        output = None
        remove_gpkg(temporary)
        raise


def _strip_rows(raster: gdal.Dataset, strip_pixels: int) -> int:
    """Rows per polygonize strip: the whole height unless the raster is north-up (seams are then lines of
    constant y) and larger than `strip_pixels`."""
    _, _, row_rotation, _, column_rotation, _ = raster.GetGeoTransform()
    if row_rotation or column_rotation:
        return raster.RasterYSize
    return max(1, strip_pixels // raster.RasterXSize)


def _polygonize_in_strips(
    output: gdal.Dataset,
    layer: ogr.Layer,
    raster: gdal.Dataset,
    rows: int,
    report: Callable[[float], None],
    cancelled: Callable[[], bool],
) -> None:
    """GDAL's polygonize strip by strip: its memory grows with the area it covers (measured at
    400 MP: 560 MB in one pass). Pieces of one cluster whose pixels meet across a seam are
    recorded as they come, and each region made of several pieces is joined back at the end
    (gis/seams.py).
    """
    x0, pixel_width, _, y0, _, pixel_height = raster.GetGeoTransform()
    width, height = raster.RasterXSize, raster.RasterYSize
    tops = range(0, height, rows)
    # Each strip's origin is the previous strip's bottom edge as GDAL computes it, so seam
    # vertices are bit-identical on both sides.
    origins = [y0]
    for _ in tops[1:]:
        origins.append(origins[-1] + rows * pixel_height)
    joined = SeamJoins()
    from_above: SeamRuns = {}
    for index, top in enumerate(tops):
        if cancelled():
            raise Cancelled()
        strip_height = min(rows, height - top)
        strip = gdal.Translate("", raster, format="VRT", srcWin=[0, top, width, strip_height])
        strip.SetGeoTransform((x0, pixel_width, 0.0, origins[index], 0.0, pixel_height))
        band = strip.GetRasterBand(1)
        first_new = _last_fid(output, layer) + 1

        def strip_progress(fraction: float, message: str, data: object, top: int = top,
                           rows: int = strip_height) -> int:
            if cancelled():
                return 0
            report((top + min(fraction, 1.0) * rows) / height * STRIPS_SHARE)
            return 1

        gdal.Polygonize(band, band.GetMaskBand(), layer, 0, [], callback=strip_progress)
        first_row = origins[index] + pixel_height / 2 if index else None
        last_row = origins[index + 1] - pixel_height / 2 if index + 1 < len(origins) else None
        from_below, to_below = _seam_runs(output, layer, first_new, first_row, last_row)
        for cluster, pieces in from_below.items():
            joined.across_seam(from_above.get(cluster, []), pieces)
        from_above = to_below
    groups = joined.groups()
    seams = np.array(origins[1:])
    for done, fids in enumerate(groups):
        if cancelled():
            raise Cancelled()
        _merge_features(layer, fids, seams)
        report(STRIPS_SHARE + (POLYGONIZE_SHARE - STRIPS_SHARE) * done / len(groups))


def _last_fid(output: gdal.Dataset, layer: ogr.Layer) -> int:
    query = f'SELECT MAX("{layer.GetFIDColumn()}") FROM "{_quoted(layer.GetName())}"'  # nosec B608
    result = output.ExecuteSQL(query)
    try:
        return result.GetNextFeature().GetField(0) or 0
    finally:
        output.ReleaseResultSet(result)


def _seam_runs(output: gdal.Dataset, layer: ogr.Layer, first_fid: int, first_row: float | None,
               last_row: float | None) -> tuple[SeamRuns, SeamRuns]:
    """By cluster, the new pieces with pixels on the strip's first row (y of its centres) and on its last
    row, each as (fid, x extents of its pixel runs there)."""
    on_first: SeamRuns = {}
    on_last: SeamRuns = {}
    for fid, cluster, rings in _new_polygons_on_rows(output, layer, first_fid, (first_row, last_row)):
        for row_y, side in ((first_row, on_first), (last_row, on_last)):
            runs = runs_on_line(rings, row_y) if row_y is not None else []
            if runs:
                side.setdefault(cluster, []).append((fid, runs))
    return on_first, on_last


def _new_polygons_on_rows(
    output: gdal.Dataset, layer: ogr.Layer, first_fid: int, rows_y: tuple[float | None, float | None]
) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(fid, cluster, rings) of the new polygons (fid >= first_fid) that reach one of the rows at `rows_y`."""
    fid, geometry = layer.GetFIDColumn(), layer.GetGeometryColumn()
    reaching = " OR ".join(f'(ST_MinY("{geometry}") < {y!r} AND ST_MaxY("{geometry}") > {y!r})'
                           for y in rows_y if y is not None)
    if not reaching:
        return
    query = (f'SELECT "{fid}", cluster, "{geometry}" FROM "{_quoted(layer.GetName())}" '  # nosec B608
             f'WHERE "{fid}" >= {int(first_fid)} AND ({reaching})')
    result = output.ExecuteSQL(query)
    try:
        for feature in result:
            yield feature.GetFID(), feature.GetField("cluster"), _rings(feature)
    finally:
        output.ReleaseResultSet(result)


def _merge_features(layer: ogr.Layer, fids: list[int], seams: np.ndarray) -> None:
    """Replace the features `fids` (the pieces of one region of one cluster) by the region."""
    pieces = []
    cluster = 0
    for fid in fids:
        feature = layer.GetFeature(fid)
        cluster = feature.GetField("cluster")
        pieces.append(_rings(feature))
        layer.DeleteFeature(fid)
    merged = ogr.Feature(layer.GetLayerDefn())
    merged.SetField("cluster", int(cluster))
    merged.SetGeometryDirectly(ogr.CreateGeometryFromWkb(polygon_wkb(join_pieces(pieces, seams))))
    layer.CreateFeature(merged)


def _rings(feature: ogr.Feature) -> list[np.ndarray]:
    """The rings of a feature's polygon as numpy arrays (gis/seams.py works on those)."""
    return polygon_rings(feature.GetGeometryRef().ExportToWkb(ogr.wkbNDR))


def _quoted(name: str) -> str:
    return name.replace('"', '""')


def _fill_attributes_in_sql(
    output: gdal.Dataset, layer_name: str, tree_clusters: Sequence[int], srs: osr.SpatialReference | None
) -> bool:
    """Set is_tree and area_m2 with one SQL UPDATE (projected CRS: planar area times the unit in m²);
    False when that cannot be done here (geographic CRS, or a GDAL without ST_Area)."""
    if srs is None or srs.IsGeographic():
        return False
    trees = ", ".join(str(int(cluster)) for cluster in tree_clusters)
    is_tree = f"(cluster IN ({trees}))" if trees else "0"
    square_metres = srs.GetLinearUnits() ** 2
    table = _quoted(layer_name)
    output.StartTransaction()
    try:
        update = f'UPDATE "{table}" SET is_tree = {is_tree}, area_m2 = ST_Area(geom) * {square_metres!r}'  # nosec B608
        output.ExecuteSQL(update)
    except RuntimeError:
        output.RollbackTransaction()
        return False
    output.CommitTransaction()
    return True


def _fill_attributes(
    output: gdal.Dataset,
    layer: ogr.Layer,
    tree_clusters: set[int],
    measure: Callable[[ogr.Geometry], tuple[float, float] | None],
    report: Callable[[float], None],
    cancelled: Callable[[], bool],
) -> None:
    """Set is_tree and area_m2 on every feature in one transaction, geometry by geometry."""
    total = max(layer.GetFeatureCount(), 1)
    output.StartTransaction()
    count = 0
    layer.ResetReading()
    for feature in layer:
        feature.SetField("is_tree", int(feature.GetField("cluster") in tree_clusters))
        measures = measure(feature.GetGeometryRef())
        if measures is None:
            feature.SetFieldNull("area_m2")
        else:
            feature.SetField("area_m2", measures[0])
        layer.SetFeature(feature)
        count += 1
        if count % CHECK_EVERY == 0:
            if cancelled():
                raise Cancelled()
            report(POLYGONIZE_SHARE + (1.0 - POLYGONIZE_SHARE) * count / total)
    output.CommitTransaction()


def raster_crs(raster: gdal.Dataset) -> osr.SpatialReference | None:
    """The raster's CRS with x first (easting or longitude), as the geotransform has it; None without one."""
    srs = raster.GetSpatialRef()
    if srs is not None:
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def metric_measures(
    srs: osr.SpatialReference | None, raster: gdal.Dataset
) -> Callable[[ogr.Geometry], tuple[float, float] | None]:
    """A function giving a geometry's (area m², perimeter m); None without a CRS.

    Projected CRS: the geometry in its units times the linear unit in metres.
    Geographic CRS: the geometry in a Lambert azimuthal equal-area CRS centred on
    the raster (areas exact, perimeters close for a raster's extent).
    """
    if srs is None:
        return lambda geometry: None
    if srs.IsGeographic():
        x0, dx, rx, y0, ry, dy = raster.GetGeoTransform()
        half_width, half_height = raster.RasterXSize / 2, raster.RasterYSize / 2
        centre_x = x0 + dx * half_width + rx * half_height
        centre_y = y0 + ry * half_width + dy * half_height
        degrees = srs.GetAngularUnits() / math.radians(1.0)
        equal_area = osr.SpatialReference()
        equal_area.CopyGeogCSFrom(srs)
        equal_area.SetLAEA(centre_y * degrees, centre_x * degrees, 0.0, 0.0)
        equal_area.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        transform = osr.CoordinateTransformation(srs, equal_area)

        def geographic_measures(geometry: ogr.Geometry) -> tuple[float, float]:
            projected = geometry.Clone()
            projected.Transform(transform)
            return projected.GetArea(), projected.Boundary().Length()

        return geographic_measures
    metres_per_unit = srs.GetLinearUnits()
    return lambda geometry: (geometry.GetArea() * metres_per_unit**2,
                             geometry.Boundary().Length() * metres_per_unit)


def replace_gpkg(temporary: str, final: str) -> None:
    try:
        for suffix in SQLITE_SIDECARS:
            if os.path.exists(final + suffix):
                os.remove(final + suffix)
        os.replace(temporary, final)
    except OSError as error:
        raise OutputError(
            f"Cannot replace '{final}': {error.strerror}. Remove its layer from the QGIS "
            "project (or close the program using it), or choose another output path."
        ) from error


def remove_gpkg(path: str) -> None:
    for candidate in (path, *(path + suffix for suffix in SQLITE_SIDECARS)):
        if os.path.exists(candidate):
            os.remove(candidate)
