"""Adds the outputs of one run to the QGIS project as a styled layer group.

QGIS side only (no torch): the run record of the engine names the files; the
cluster raster keeps the colours and names its writer gave it, the tree mask
shows trees in green, the polygons fill trees and outline the rest; the optional
crowns are gold outlines, the feature image an RGB composite and the canopy
height a green ramp in metres. Click-to-teach results (similarity and taught
trees) go into a group of their own, replacing the previous ones. Layers keep
the CRS of their files, which is the input's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from osgeo import gdal
from qgis.core import (
    QgsBasicNumericFormat,
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGradientStop,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsMessageLog,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRuleBasedRenderer,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from .outputs import UNTRAINED_TAG

gdal.UseExceptions()

LOG_TAG = "TreeSeg"
TREE_GREEN = QColor(34, 139, 34)
TREE_FILL = {"color": "34,139,34,120", "outline_color": "0,90,0,255", "outline_width": "0.4"}
OTHER_OUTLINE = {"style": "no", "outline_color": "110,110,110,255", "outline_width": "0.2"}
CROWN_OUTLINE = {"style": "no", "outline_color": "255,215,0,255", "outline_width": "0.5"}
HEIGHT_RAMP = (QColor(247, 252, 245), QColor(199, 233, 192), QColor(116, 196, 118), QColor(35, 139, 69),
               QColor(0, 68, 27))
SIMILARITY_RAMP = (QColor(68, 1, 84), QColor(59, 82, 139), QColor(33, 145, 140), QColor(94, 201, 98),
                   QColor(253, 231, 37))


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
    """Load the outputs of `record` into a new group at the top of the layer tree: crowns (when made),
    polygons, tree mask (hidden), clusters, then the feature image and canopy height (when made, hidden);
    raises ResultLayerError (and adds nothing) when a file cannot be opened."""
    project = project or QgsProject.instance()
    outputs = record["outputs"]
    cover = 100 * float(record["trees"]["tree_cover"])
    layers = []
    if "crowns" in outputs:
        layers.append(_open(QgsVectorLayer(outputs["crowns"], f"Tree crowns ({record['crowns']})", "ogr")))
        style_crowns(layers[-1])
    polygons = _open(QgsVectorLayer(outputs["polygons"], "Tree polygons", "ogr"))
    trees = _open(QgsRasterLayer(outputs["trees"], f"Tree mask ({cover:.1f} % cover)", "gdal"))
    clusters = _open(QgsRasterLayer(outputs["clusters"], f"Clusters (K={record['clusters']['k']})", "gdal"))
    style_polygons(polygons)
    style_tree_mask(trees)
    style_clusters(clusters, int(record["clusters"]["k"]))
    layers += [polygons, trees, clusters]
    hidden = [trees]
    if "features" in outputs:
        layers.append(_open(QgsRasterLayer(outputs["features"], "Feature image (PCA RGB)", "gdal")))
        style_feature_image(layers[-1])
        hidden.append(layers[-1])
    if "height" in outputs:
        untrained = record["model"].get("height_model", {}).get("untrained")
        name = f"Canopy height (m) — {UNTRAINED_TAG}" if untrained else "Canopy height (m)"
        layers.append(_open(QgsRasterLayer(outputs["height"], name, "gdal")))
        style_height(layers[-1])
        hidden.append(layers[-1])
    group = QgsLayerTreeGroup(group_name(record, input_name))
    for layer in layers:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    for layer in hidden:
        group.findLayer(layer.id()).setItemVisibilityChecked(False)
    project.layerTreeRoot().insertChildNode(0, group)
    group.setExpanded(False)
    group.setExpanded(True)
    return group


def teach_group_name(record: dict[str, Any], input_name: str) -> str:
    """E.g. 'OSBS_029 — taught by example', with ' — UNTRAINED' when the weights were random."""
    name = f"{input_name} — taught by example"
    return f"{name} — {UNTRAINED_TAG}" if record["model"]["untrained"] else name


def add_teach_layers(record: dict[str, Any], input_name: str, project: QgsProject | None = None,
                     replacing: Sequence[str] = ()) -> list[QgsMapLayer]:
    """Load the taught mask (trees, or the record's class) and the similarity of a teach `record`; they take
    the place of the layers whose ids are in `replacing` (removed from the project) or else go into a new group
    at the top. Returns the new layers; raises ResultLayerError (and changes nothing) when a file cannot be opened."""
    project = project or QgsProject.instance()
    outputs = record["outputs"]
    cover = 100 * float(record["tree_cover"])
    taught = record.get("class") or "tree"
    taught_name = "Taught trees" if taught == "tree" else f"Taught: {taught}"
    trees = _open(QgsRasterLayer(
        outputs["taught_trees"], f"{taught_name} (score ≥ {float(record['threshold']):.2f}, {cover:.1f} % cover)",
        "gdal"))
    similarity = _open(QgsRasterLayer(outputs["similarity"], f"{taught.capitalize()} similarity (0–1)", "gdal"))
    style_tree_mask(trees)
    style_similarity(similarity)
    root = project.layerTreeRoot()
    previous = [node for node in (root.findLayer(layer_id) for layer_id in replacing) if node is not None]
    group = previous[0].parent() if previous else None
    if group is None:
        group = QgsLayerTreeGroup()
        root.insertChildNode(0, group)
    if group.parent() is not None:
        group.setName(teach_group_name(record, input_name))
    project.removeMapLayers([node.layerId() for node in previous])
    for position, layer in enumerate((trees, similarity)):
        project.addMapLayer(layer, False)
        group.insertLayer(position, layer)
    if not previous:
        group.setExpanded(False)
        group.setExpanded(True)
    return [trees, similarity]


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


def style_crowns(layer: QgsVectorLayer) -> None:
    """Gold outlines, no fill: each crown stands out over the orthophoto and the tree polygons."""
    layer.renderer().setSymbol(QgsFillSymbol.createSimple(CROWN_OUTLINE))
    layer.triggerRepaint()


def style_feature_image(layer: QgsRasterLayer) -> None:
    """RGB from bands 1, 2, 3 as written (the engine already scaled the components to 1..255)."""
    layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 1, 2, 3))
    layer.triggerRepaint()


def style_height(layer: QgsRasterLayer) -> None:
    """Pseudocolour from pale (0 m) to dark green (the highest canopy), labelled in metres."""
    dataset = gdal.Open(layer.source())
    highest = max(float(dataset.GetRasterBand(1).ComputeRasterMinMax(True)[1]), 1.0)
    dataset = None
    _pseudocolour(layer, 0.0, highest, HEIGHT_RAMP, decimals=1, suffix=" m")


def style_similarity(layer: QgsRasterLayer) -> None:
    """Pseudocolour over the score range 0..1, from unlike (dark) to like the tree examples (yellow)."""
    _pseudocolour(layer, 0.0, 1.0, SIMILARITY_RAMP, decimals=2)


def _pseudocolour(layer: QgsRasterLayer, low: float, high: float, colours: Sequence[QColor], decimals: int,
                  suffix: str = "") -> None:
    """A continuous single-band ramp through `colours` spread evenly from `low` to `high`; values in the
    legend and the class labels with `decimals` and `suffix` (a unit)."""
    stops = [low + (high - low) * index / (len(colours) - 1) for index in range(len(colours))]
    items = [QgsColorRampShader.ColorRampItem(value, colour, f"{value:.{decimals}f}{suffix}")
             for value, colour in zip(stops, colours)]
    number_format = QgsBasicNumericFormat()
    number_format.setNumberDecimalPlaces(decimals)
    legend = QgsColorRampLegendNodeSettings()
    legend.setNumericFormat(number_format)
    legend.setSuffix(suffix)
    ramp = QgsColorRampShader(low, high)
    ramp.setLegendSettings(legend)
    inner_stops = [QgsGradientStop(index / (len(colours) - 1), colour) for index, colour in enumerate(colours)][1:-1]
    ramp.setSourceColorRamp(QgsGradientColorRamp(colours[0], colours[-1], False, inner_stops))
    ramp.setColorRampItemList(items)
    shader = QgsRasterShader(low, high)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def _open(layer: QgsMapLayer) -> QgsMapLayer:
    if not layer.isValid():
        raise ResultLayerError(f"Cannot open the output {layer.source()} as a layer.")
    if not layer.crs().isValid():
        QgsMessageLog.logMessage(f"{layer.source()} has no coordinate reference system.", LOG_TAG)
    return layer
