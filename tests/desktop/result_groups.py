"""Run by `qgis.bin --code` (tests/test_result_groups_desktop.py): Processing runs in the real QGIS window as an
analyst makes them — a run, its group moved into a group of their own and selected in Layers, a batch row with a
blank optional output, a repeat, a run with another K, two teach runs — and the layer tree, the errors the runs
reported and the layer count written as JSON."""

import json
import os
import sys
import traceback

from qgis.core import (
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsLayerTree,
    QgsPointXY,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProject,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface

SEGMENT = "treeseg:segmenttrees"
RUN_OUTPUTS = ("OUTPUT_CLUSTERS", "OUTPUT_TREES", "OUTPUT_POLYGONS")


class Recorder(QgsProcessingFeedback):
    """Keeps what the runs report as errors (what the dialog shows in red)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors = []

    def reportError(self, error, fatalError=False):  # noqa: N802, N803 - QGIS override
        self.errors.append(error)
        super().reportError(error, fatalError)


def tree(node) -> dict:
    if QgsLayerTree.isGroup(node):
        return {"group": node.name(), "checked": node.itemVisibilityChecked(),
                "children": [tree(child) for child in node.children()]}
    return {"layer": node.name(), "checked": node.itemVisibilityChecked()}


def temporary(*names: str) -> dict:
    """Output definitions as the dialogs set them: temporary files, loaded into the project."""
    return {name: QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", QgsProject.instance()) for name in names}


def batch_row(algorithm_id: str, parameters: dict, feedback: Recorder) -> None:
    """One row as the batch dialog runs it: the algorithm, then its results handled (loaded, checked)."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from processing.tools import dataobjects

    algorithm = QgsApplication.processingRegistry().createAlgorithmById(algorithm_id)
    context = dataobjects.createContext(feedback)
    _, ok = algorithm.run(algorithm.preprocessParameters(parameters), context, feedback)
    assert ok, feedback.errors
    handleAlgorithmResults(algorithm, context, feedback)


def examples_layer(raster) -> QgsVectorLayer:
    """Two clicks on crowns (is_tree 1) and two on soil (0) of the scene, in its CRS."""
    layer = QgsVectorLayer(f"Point?crs={raster.crs().authid()}&field=is_tree:integer", "examples", "memory")
    extent, width, height = raster.extent(), raster.width(), raster.height()
    for (col, row), is_tree in (((80, 70), 1), ((300, 90), 1), ((20, 20), 0), ((150, 10), 0)):
        feature = QgsFeature(layer.fields())
        x = extent.xMinimum() + (col + 0.5) * extent.width() / width
        y = extent.yMaximum() - (row + 0.5) * extent.height() / height
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        feature["is_tree"] = is_tree
        layer.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(layer, False)
    return layer


def drive() -> dict:
    sys.path.insert(0, os.environ["TREESEG_REPO"])
    import processing
    from processing.core.Processing import Processing

    from treeseg_qgis.qgis_side.processing.provider import TreesegProvider

    Processing.initialize()
    provider = TreesegProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    feedback = Recorder()
    raster = iface.addRasterLayer(os.environ["TREESEG_INPUT"], "scene")
    run = {"INPUT": raster.id(), "MODEL_ID": os.environ["TREESEG_MODEL"], "CLUSTERS": 2, "DEVICE": "cpu"}

    processing.runAndLoadResults(SEGMENT, {**run, **temporary(*RUN_OUTPUTS)}, feedback=feedback)
    root = QgsProject.instance().layerTreeRoot()
    first = root.children()[0]
    site = root.addGroup("Site")
    site.addChildNode(first.clone())
    root.removeChildNode(first)
    nested = site.children()[0]
    view = iface.layerTreeView()
    view.setCurrentIndex(view.layerTreeModel().node2index(nested))  # as a click on it in Layers

    blank_crowns = {"OUTPUT_CROWNS": QgsProcessingOutputLayerDefinition("", QgsProject.instance())}
    batch_row(SEGMENT, {**run, **temporary(*RUN_OUTPUTS), **blank_crowns}, feedback)
    after_batch = tree(root)
    processing.runAndLoadResults(SEGMENT, {**run, **temporary(*RUN_OUTPUTS)}, feedback=feedback)
    processing.runAndLoadResults(SEGMENT, {**run, "CLUSTERS": 3, **temporary(*RUN_OUTPUTS)}, feedback=feedback)
    examples = examples_layer(raster)
    for _ in range(2):
        processing.runAndLoadResults("treeseg:teach", {
            "INPUT": raster.id(), "EXAMPLES": examples.id(), "MODEL_ID": os.environ["TREESEG_MODEL"], "DEVICE": "cpu",
            **temporary("OUTPUT_SIMILARITY", "OUTPUT_TREES")}, feedback=feedback)
    return {"after_batch": after_batch, "tree": tree(root), "errors": feedback.errors,
            "layers": len(QgsProject.instance().mapLayers())}


def main() -> None:
    try:
        found = drive()
    except Exception:  # noqa: BLE001 - the test shows what went wrong
        found = {"exception": traceback.format_exc()}
    with open(os.environ["TREESEG_OUT"], "w", encoding="utf-8") as file:
        json.dump(found, file)
    QgsApplication.exit(0)


QTimer.singleShot(0, main)
