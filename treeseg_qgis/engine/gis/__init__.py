"""The engine's GDAL side: raster windows, writers, polygons, crowns, references and previews. Importing any of
them switches GDAL, OGR and OSR to raising exceptions, which every module here relies on."""

from osgeo import gdal, ogr, osr

for _bindings in (gdal, ogr, osr):
    _bindings.UseExceptions()
