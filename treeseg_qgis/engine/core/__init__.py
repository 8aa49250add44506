"""QGIS-free engine: models, dense features, tiling, clustering and the tree rule.

Nothing here may import qgis, osgeo or PyQt (tests/test_core_is_qgis_free.py).
"""
