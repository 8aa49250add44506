"""Adds the outputs of one run to the QGIS project as a styled layer group.

QGIS side only (no torch): the run record of the engine names the files; the
cluster raster keeps the colours and names its writer gave it, the tree mask
shows trees in green, the polygons fill trees and outline the rest. Layers keep
the CRS of their files, which is the input's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from osgeo import gdal
from qgis.core import (
    QgsFillSymbol,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsMessageLog,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRuleBasedRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from .outputs import UNTRAINED_TAG

gdal.UseExceptions()

LOG_TAG = "TreeSeg"
TREE_GREEN = QColor(34, 139, 34)
TREE_FILL = {"color": "34,139,34,120", "outline_color": "0,90,0,255", "outline_width": "0.4"}
OTHER_OUTLINE = {"style": "no", "outline_color": "110,110,110,255", "outline_width": "0.2"}


class ResultLayerError(RuntimeError):
    """An output file of the run could not be opened as a layer."""


def model_label(record: dict[str, Any]) -> str:
    """The model as the user chose it: a catalogue name, or the last part of an id or folder."""
    requested = str(record.get("requested_model") or record["model"]["model_id"])
    return Path(requested.rstrip("/\\")).name or requested


def group_name(record: dict[str, Any], input_name: str) -> str:
    """E.g. 'OSBS_029 — base, stride 16', with ' — UNTRAINED' when the weights were random."""
    name = f"{input_name} — {model_label(record)}, stride {record['stride']}"
    return f"{name} — {UNTRAINED_TAG}" if record["model"]["untrained"] else name


def add_result_layers(record: dict[str, Any], input_name: str,
                      project: QgsProject | None = None) -> QgsLayerTreeGroup:
    """Load the clusters, the tree mask and the polygons of `record` into a new group at the top of
    the layer tree; raises ResultLayerError (and adds nothing) when a file cannot be opened."""
    project = project or QgsProject.instance()
    outputs = record["outputs"]
    cover = 100 * float(record["trees"]["tree_cover"])
    polygons = _open(QgsVectorLayer(outputs["polygons"], "Tree polygons", "ogr"))
    trees = _open(QgsRasterLayer(outputs["trees"], f"Tree mask ({cover:.1f} % cover)", "gdal"))
    clusters = _open(QgsRasterLayer(outputs["clusters"], f"Clusters (K={record['clusters']['k']})", "gdal"))
    style_polygons(polygons)
    style_tree_mask(trees)
    style_clusters(clusters, int(record["clusters"]["k"]))
    group = QgsLayerTreeGroup(group_name(record, input_name))
    for layer in (polygons, trees, clusters):
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    group.findLayer(trees.id()).setItemVisibilityChecked(False)
    project.layerTreeRoot().insertChildNode(0, group)
    group.setExpanded(False)
    group.setExpanded(True)
    return group


def style_clusters(layer: QgsRasterLayer, k: int) -> None:
    """Paletted: the colours and category names the engine wrote into the file, for ids 0..k-1."""
    dataset = gdal.Open(layer.source())
    band = dataset.GetRasterBand(1)
    table = band.GetColorTable()
    colours = [QColor(*table.GetColorEntry(cluster)) if table is not None else QColor() for cluster in range(k)]
    names = band.GetCategoryNames() or []
    dataset = None
    classes = [
        QgsPalettedRasterRenderer.Class(
            cluster, colour, names[cluster] if cluster < len(names) and names[cluster] else f"Cluster {cluster}")
        for cluster, colour in enumerate(colours)
    ]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes))
    layer.triggerRepaint()


def style_tree_mask(layer: QgsRasterLayer) -> None:
    """Paletted: 1 green 'tree', 0 transparent 'not tree'."""
    classes = [
        QgsPalettedRasterRenderer.Class(1, TREE_GREEN, "tree"),
        QgsPalettedRasterRenderer.Class(0, QColor(0, 0, 0, 0), "not tree"),
    ]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes))
    layer.triggerRepaint()


def style_polygons(layer: QgsVectorLayer) -> None:
    """Rule-based on is_tree: trees filled green with a dark outline, the rest hollow grey outlines."""
    root = QgsRuleBasedRenderer.Rule(None)
    root.appendChild(QgsRuleBasedRenderer.Rule(QgsFillSymbol.createSimple(TREE_FILL),
                                               filterExp='"is_tree"', label="tree"))
    root.appendChild(QgsRuleBasedRenderer.Rule(QgsFillSymbol.createSimple(OTHER_OUTLINE),
                                               label="not tree", elseRule=True))
    layer.setRenderer(QgsRuleBasedRenderer(root))
    layer.triggerRepaint()


def _open(layer: QgsMapLayer) -> QgsMapLayer:
    if not layer.isValid():
        raise ResultLayerError(f"Cannot open the output {layer.source()} as a layer.")
    if not layer.crs().isValid():
        QgsMessageLog.logMessage(f"{layer.source()} has no coordinate reference system.", LOG_TAG)
    return layer
