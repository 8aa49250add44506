"""treeseg-qgis: label-free tree segmentation of orthophotos with DINOv3 features.

This module is the QGIS plugin entry point; importing the package never imports
qgis, so the engine and the command line run without QGIS.
"""

from pathlib import Path


def _metadata_version() -> str:
    """The plugin's version, from metadata.txt (the one place it is written): in the plugin folder when
    installed from the zip, beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    for metadata in (package / "metadata.txt", package.parent / "metadata.txt"):
        if metadata.is_file():
            for line in metadata.read_text(encoding="utf-8").splitlines():
                if line.startswith("version="):
                    return line.split("=", 1)[1].strip()
    return "unknown"


__version__ = _metadata_version()


def classFactory(iface):  # noqa: N802 - the name QGIS looks for
    """QGIS calls this to create the plugin."""
    from .qgis_side.plugin import TreesegPlugin

    return TreesegPlugin(iface)
