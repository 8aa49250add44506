"""treeseg-qgis: label-free tree segmentation of orthophotos with DINOv3 features.

This module is the QGIS plugin entry point; importing the package never imports
qgis, so the engine and the command line run without QGIS.
"""

__version__ = "0.1.0"


def classFactory(iface):  # noqa: N802 - the name QGIS looks for
    """QGIS calls this to create the plugin."""
    from .qgis_side.plugin import TreesegPlugin

    return TreesegPlugin(iface)
