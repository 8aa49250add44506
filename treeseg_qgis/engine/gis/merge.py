"""One GeoPackage of the polygons of many rasters, each feature marked with the raster it came from."""

from __future__ import annotations

from collections.abc import Sequence

from osgeo import ogr, osr

SOURCE_FIELD = "source"


def merge_polygons(parts: Sequence[tuple[str, str]], out_path: str, layer_name: str) -> int:
    """Copy the first layer of every (source name, GeoPackage) into one layer of `out_path` with a `source`
    field; geometries in another CRS than the first part's are reprojected into it. Returns the count."""
    driver = ogr.GetDriverByName("GPKG")
    out = driver.CreateDataSource(out_path)
    first = ogr.Open(parts[0][1]) if parts else None
    first_layer = first.GetLayer(0) if first else None
    srs = first_layer.GetSpatialRef() if first_layer else None
    layer = out.CreateLayer(layer_name, srs, ogr.wkbMultiPolygon)
    layer.CreateField(ogr.FieldDefn(SOURCE_FIELD, ogr.OFTString))
    if first_layer is not None:
        definition = first_layer.GetLayerDefn()
        for index in range(definition.GetFieldCount()):
            layer.CreateField(definition.GetFieldDefn(index))
    count = 0
    out.StartTransaction()
    for source_name, path in parts:
        dataset = ogr.Open(path)
        part = dataset.GetLayer(0)
        transform = _transform(part.GetSpatialRef(), srs)
        for feature in part:
            merged = ogr.Feature(layer.GetLayerDefn())
            merged.SetFrom(feature)
            merged.SetField(SOURCE_FIELD, source_name)
            geometry = feature.GetGeometryRef()
            if geometry is not None:
                geometry = ogr.ForceToMultiPolygon(geometry.Clone())
                if transform is not None:
                    geometry.Transform(transform)
                merged.SetGeometry(geometry)
            layer.CreateFeature(merged)
            count += 1
        dataset = None
    out.CommitTransaction()
    out = None
    return count


def _transform(source: osr.SpatialReference | None,
               target: osr.SpatialReference | None) -> osr.CoordinateTransformation | None:
    if source is None or target is None or source.IsSame(target):
        return None
    for srs in (source, target):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return osr.CoordinateTransformation(source, target)
