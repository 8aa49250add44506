"""QGIS-free engine: models, dense features, the feature grid, tiling, clustering and the tree rule.

Nothing here may import qgis, osgeo, Qt, engine/gis or qgis_side, relative imports included
(tests/test_process_boundary.py).
"""
