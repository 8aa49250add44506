"""The Processing algorithm `treeseg:evaluate`: quality of a tree segmentation against reference data.

It runs inside QGIS: treeseg_qgis.evaluate needs numpy, scipy, GDAL and
matplotlib, no torch. That module (through the engine's gis package under it) calls
`UseExceptions()` when imported, while QGIS runs GDAL's Python bindings
without exceptions; so it is imported only inside processAlgorithm, with the
exceptions switched on for the run and set back afterwards (`gdal_exceptions`).

evaluate() reads files, and the first layer of a vector file: a vector layer
that is not a plain single-layer file (a memory layer, a filtered layer, one
layer of a multi-layer GeoPackage) is exported to a temporary GeoPackage first,
in prepareAlgorithm, on the thread that owns the layers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputHtml,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingUtils,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsVectorFileWriter,
    QgsVectorLayer,
)

from ..compat import EXPORT_OK, INTEGER, POLYGON_LAYERS, RASTER_LAYERS
from ..raster_input import UNSAFE_FILENAME_CHARACTERS, raster_file
from .engine_algorithm import DescribedAlgorithm, Value


def score(name: str, group: str, measure: str, description: str) -> Value:
    """An output number of a measure in evaluate()'s scores."""
    return Value(name, (group, measure), QgsProcessingOutputNumber, description)


SCORES = (
    score("PIXEL_PRECISION", "pixel", "precision", "Pixel precision of the tree class"),
    score("PIXEL_RECALL", "pixel", "recall", "Pixel recall of the tree class"),
    score("PIXEL_F1", "pixel", "f1", "Pixel F1 of the tree class"),
    score("PIXEL_IOU", "pixel", "iou", "Pixel IoU of the tree class"),
    score("CROWN_PRECISION", "crowns", "crown_precision", "Crown precision (matched at IoU ≥ 0.4)"),
    score("CROWN_RECALL", "crowns", "crown_recall", "Crown recall (matched at IoU ≥ 0.4)"),
    score("CROWN_F1", "crowns", "crown_f1", "Crown F1"),
    score("BOX_RECALL", "boxes", "box_recall",
          "Box recall: reference objects with at least 25 % of their area predicted"),
    score("IN_BOX_PRECISION", "boxes", "in_box_precision",
          "In-box precision: share of predicted pixels inside an object"),
    score("TREE_COVER", "boxes", "tree_cover", "Share of the valid pixels predicted as trees"),
    score("CENTROID_BOX_RECALL", "crowns", "centroid_box_recall",
          "Centroid box recall: reference objects holding a predicted crown centre"),
    score("MIOU", "clusters", "miou", "Mean IoU of the clusters against the reference classes"),
    score("PIXEL_ACCURACY", "clusters", "pixel_accuracy",
          "Pixel accuracy of the clusters against the reference classes"),
)

HELP_TEXT = """<p>Measures how good a tree segmentation is against <b>your reference data</b>, and writes
a CSV and an HTML report (shown in the results viewer) with a picture of the image, the reference
and the prediction.</p>
<h3>Inputs</h3>
<ul>
<li><b>Prediction</b>: a tree-mask raster (1 = tree), tree polygons with an <i>is_tree</i> field, or
crown polygons with a <i>crown_id</i> field (each crown one instance).</li>
<li><b>Reference</b>: polygons (crown outlines, or boxes around trees; any CRS) or a class raster on
the prediction's grid (trees = the tree class).</li>
<li><b>Image</b>: the orthophoto; needed when the prediction is polygons (they are rasterized on
its grid), and shown in the report.</li>
<li><b>Clusters</b> (optional, with a class raster as reference): the cluster raster, for the mean
IoU and pixel accuracy of the clusters after matching them one-to-one to the classes.</li>
</ul>
<h3>Measures</h3>
<ul>
<li><b>Pixel</b> precision, recall, F1 and IoU of the tree class.</li>
<li>With reference polygons: <b>crown</b> precision, recall and F1 (one-to-one matching at IoU ≥ 0.4),
<b>box recall</b> (share of reference objects with at least 25 % of their area predicted), <b>in-box
precision</b> (share of predicted pixels inside some reference object), tree cover, and the
<b>centroid box recall</b> (share of reference objects holding the centre of a predicted crown; it
depends on how the mask is split into crowns).</li>
<li>With a class raster and clusters: <b>mIoU</b> and <b>pixel accuracy</b>.</li>
</ul>
<p>Each measure is also an output number, for use further down a model; measures that do not apply
to the inputs are left out. Runs inside QGIS; no model and no engine process are needed.</p>"""


class EvaluateSegmentationAlgorithm(DescribedAlgorithm):
    """Scores of a tree prediction against reference polygons or a class raster, with a report."""

    NAME = "evaluate"
    DISPLAY_NAME = "Evaluate tree segmentation"
    GROUP = "Quality"
    TAGS = ("evaluation", "accuracy", "precision", "recall", "f1", "iou", "miou", "reference", "ground truth",
                "trees", "crowns", "quality")
    HELP = HELP_TEXT

    PREDICTION = "PREDICTION"
    REFERENCE = "REFERENCE"
    IMAGE = "IMAGE"
    CLUSTERS = "CLUSTERS"
    TREE_CLASS = "TREE_CLASS"
    OUTPUT_FOLDER = "OUTPUT_FOLDER"
    VALUES = (Value("OUTPUT_HTML", ("outputs", "html"), QgsProcessingOutputHtml, "Evaluation report"),
              Value("OUTPUT_CSV", ("outputs", "csv"), QgsProcessingOutputFile, "Evaluation table (CSV)"), *SCORES)

    def __init__(self) -> None:
        super().__init__()
        self._files: dict[str, str | None] = {}
        self._report_name = "prediction"

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        self.addParameter(QgsProcessingParameterMapLayer(
            self.PREDICTION, "Prediction: tree mask raster, is_tree polygons or crown polygons",
            types=[RASTER_LAYERS, POLYGON_LAYERS]))
        self.addParameter(QgsProcessingParameterMapLayer(
            self.REFERENCE, "Reference: crown or box polygons, or a class raster",
            types=[POLYGON_LAYERS, RASTER_LAYERS]))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.IMAGE, "Image (the grid for polygon predictions, and the report's picture)", optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.CLUSTERS, "Clusters (for mIoU against a class raster)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TREE_CLASS, "Tree class in a reference class raster", INTEGER, defaultValue=1))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT_FOLDER, "Report folder"))
        self.add_values()

    def prepareAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> bool:
        """Resolve the layers into files here, on the thread that owns them (exports need their features)."""
        folder = Path(QgsProcessingUtils.tempFolder()) / "treeseg"
        prediction = self.parameterAsLayer(parameters, self.PREDICTION, context)
        reference = self.parameterAsLayer(parameters, self.REFERENCE, context)
        for name, layer in ((self.PREDICTION, prediction), (self.REFERENCE, reference)):
            if layer is None:
                raise QgsProcessingException(self.invalidSourceError(parameters, name))
        image = self.parameterAsRasterLayer(parameters, self.IMAGE, context)
        clusters = self.parameterAsRasterLayer(parameters, self.CLUSTERS, context)
        self._files = {
            self.PREDICTION: layer_file(prediction, folder, context, feedback),
            self.REFERENCE: layer_file(reference, folder, context, feedback),
            self.IMAGE: raster_file(image) if image is not None else None,
            self.CLUSTERS: raster_file(clusters) if clusters is not None else None,
        }
        self._report_name = UNSAFE_FILENAME_CHARACTERS.sub("_", prediction.name()) or "prediction"
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        folder = self.parameterAsFileOutput(parameters, self.OUTPUT_FOLDER, context)
        with gdal_exceptions():
            from ...engine.core.errors import TreesegError
            from ...engine.evaluate import evaluate

            feedback.setProgressText("Evaluating")
            try:
                scores = evaluate(self._files[self.PREDICTION], self._files[self.REFERENCE], folder,
                                  image=self._files[self.IMAGE], clusters=self._files[self.CLUSTERS],
                                  tree_class=self.parameterAsInt(parameters, self.TREE_CLASS, context),
                                  name=self._report_name)
            except TreesegError as error:
                raise QgsProcessingException(str(error)) from error
        if scores.get("warning"):
            feedback.reportError(scores["warning"], fatalError=False)
        results = {self.OUTPUT_FOLDER: folder, **self.results(scores)}
        for measure in SCORES:
            if measure.name in results:
                results[measure.name] = float(results[measure.name])
                feedback.pushInfo(f"{measure.description}: {results[measure.name]:.4f}")
        return results


def layer_file(layer: QgsMapLayer, folder: Path, context: QgsProcessingContext,
               feedback: QgsProcessingFeedback) -> str:
    """A file evaluate() reads as `layer`: a raster's file, a single-layer vector file, or an export."""
    if isinstance(layer, QgsRasterLayer):
        return raster_file(layer)
    if not isinstance(layer, QgsVectorLayer):
        raise QgsProcessingException(f"'{layer.name()}' is neither a raster nor a vector layer.")
    return single_layer_file(layer) or export_to_geopackage(layer, folder, context, feedback)


def single_layer_file(layer: QgsVectorLayer) -> str | None:
    """The layer's file when it is the only layer in it and unfiltered; None otherwise."""
    if layer.providerType() != "ogr" or layer.subsetString():
        return None
    path = QgsProviderRegistry.instance().decodeUri("ogr", layer.source()).get("path") or ""
    if not Path(path).is_file():
        return None
    try:
        dataset = ogr.Open(path)
    except RuntimeError:
        return None
    return path if dataset is not None and dataset.GetLayerCount() == 1 else None


def export_to_geopackage(layer: QgsVectorLayer, folder: Path, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> str:
    """The layer's features (all fields, its own CRS) in a new temporary GeoPackage."""
    folder.mkdir(parents=True, exist_ok=True)
    name = UNSAFE_FILENAME_CHARACTERS.sub("_", layer.name()) or "layer"
    path = folder / f"{name}_{uuid.uuid4().hex[:8]}.gpkg"
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = name
    options.fileEncoding = "UTF-8"
    error, message, _, _ = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(path), context.transformContext(),
                                                                     options)
    if error != EXPORT_OK:
        raise QgsProcessingException(f"Cannot export '{layer.name()}' to a GeoPackage for the evaluation: {message}")
    feedback.pushInfo(f"'{layer.name()}' exported to {path} for the evaluation.")
    return str(path)


@contextmanager
def gdal_exceptions() -> Iterator[None]:
    """GDAL, OGR and OSR exceptions on (the evaluation modules rely on them), as they were afterwards."""
    modules = (gdal, ogr, osr)
    before = [module.GetUseExceptions() for module in modules]
    for module in modules:
        module.UseExceptions()
    try:
        yield
    finally:
        for module, was_on in reversed(list(zip(modules, before))):
            if not was_on:
                module.DontUseExceptions()
