"""The Processing algorithm `treeseg:segmenttrees`: one segmentation run through the engine worker.

Nothing here imports torch or the engine's core: the parameters become a plain
dict with the keys of SegmentationParams, and the engine worker process
(engine_client.EngineClient) does the work, so the algorithm loads and explains
itself even where the engine environment is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputBoolean,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsSettings,
)

from ..engine_client import EngineClient, EngineError, find_engine_python, missing_engine_message
from .compat import ADVANCED, DOUBLE, INTEGER, POLYGON_LAYERS
from .raster_input import prepare_input

MODEL_NAMES = ("small", "small+", "base", "large", "giant", "mega", "large-sat", "mega-sat")
DEFAULT_MODEL = "base"
STRIDES = ("16", "8", "4")
DEVICES = ("auto", "cpu", "cuda", "mps")
ENGINE_PYTHON_SETTING = "treeseg/engine_python"
MODEL_PAGE = "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m"
HELP_URL = "https://github.com/treeseg-qgis/treeseg-qgis#processing-graphical-modeler-and-qgis_process"
NON_FILE_DESTINATION = re.compile(r"^(ogr|memory|postgres|postgis|spatialite|mssql|oracle|hana):", re.IGNORECASE)

HELP = f"""<p>Segments trees in a drone or aerial orthophoto <b>without training labels</b>: a DINOv3
vision transformer describes every 16 × 16 pixel patch, the descriptions are clustered, and the
clusters that are green enough are called trees.</p>
<h3>Outputs</h3>
<ul>
<li><b>Clusters</b>: a GeoTIFF with the cluster id of every pixel (255 = nodata), on the grid of the
input (or of the extent / resolution you chose).</li>
<li><b>Tree mask</b>: a GeoTIFF, 1 = tree, 0 = not tree, 255 = nodata.</li>
<li><b>Polygons</b>: a GeoPackage with one polygon per connected region and the fields
<i>cluster</i>, <i>is_tree</i> and <i>area_m2</i>.</li>
<li>Beside the clusters file: a preview image (<i>_preview.png</i>), a run record
(<i>_run.json</i>) with the model used, K, the tree rule and the timings, and with automatic K the
elbow plot (<i>_elbow.png</i>). The number of clusters,
the tree cover and the model are also returned for use in a model.</li>
</ul>
<h3>Parameters worth knowing</h3>
<ul>
<li><b>Bands</b>: red, green and blue, in that order (one band is read as grey).</li>
<li><b>Extent</b>, <b>Mask</b> and <b>Resolution</b> are applied on the fly without copying the
raster; pixels outside the mask are nodata. The raster must be a file: export web layers (WMS, XYZ)
to a GeoTIFF first.</li>
<li><b>Clusters</b>: 0 picks K automatically (elbow of the k-means inertia between the minimum and
maximum).</li>
<li><b>Stride</b>: 16 gives one feature per 16 × 16 patch; 8 costs 4 × the time, 4 costs 16 ×.</li>
</ul>
<h3>Model weights</h3>
<p>The DINOv3 weights are <b>gated</b> on Hugging Face. Once: open the model page (for the default
model <a href="{MODEL_PAGE}">{MODEL_PAGE}</a>), log in and accept the licence, then create a read
token at https://huggingface.co/settings/tokens and set the <b>HF_TOKEN</b> environment variable
before starting QGIS (or run <i>hf auth login</i>). The weights are downloaded once into the
Hugging Face cache. A Hugging Face id or a local model folder can be given under Model (advanced).</p>
<p><b>Allow untrained weights</b> lets the run go on with random weights when the real ones cannot be
had. The result is then only a check of the pipeline, not a segmentation; every output says so.</p>
<p>The model runs in a separate engine process (its own Python with torch); QGIS stays responsive
and Cancel stops it at once.</p>"""


class SegmentTreesAlgorithm(QgsProcessingAlgorithm):
    """Segment trees in an orthophoto with DINOv3 features, through the engine worker process."""

    INPUT = "INPUT"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    MASK = "MASK"
    RESOLUTION = "RESOLUTION"
    MODEL = "MODEL"
    MODEL_ID = "MODEL_ID"
    STRIDE = "STRIDE"
    CLUSTERS = "CLUSTERS"
    K_MIN = "K_MIN"
    K_MAX = "K_MAX"
    DEVICE = "DEVICE"
    ALLOW_UNTRAINED = "ALLOW_UNTRAINED"
    OUTPUT_CLUSTERS = "OUTPUT_CLUSTERS"
    OUTPUT_TREES = "OUTPUT_TREES"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"
    K = "K"
    TREE_COVER = "TREE_COVER"
    MODEL_USED = "MODEL_USED"
    UNTRAINED = "UNTRAINED"
    RUN_RECORD = "RUN_RECORD"

    def name(self) -> str:
        return "segmenttrees"

    def displayName(self) -> str:
        return "Segment trees (DINOv3)"

    def group(self) -> str:
        return "Segmentation"

    def groupId(self) -> str:
        return "segmentation"

    def tags(self) -> list[str]:
        return ["trees", "tree", "canopy", "forest", "segmentation", "dinov3", "orthophoto", "drone",
                "clustering", "unsupervised", "deep learning", "ai"]

    def shortHelpString(self) -> str:
        return HELP

    def helpUrl(self) -> str:
        return HELP_URL

    def createInstance(self) -> SegmentTreesAlgorithm:
        return SegmentTreesAlgorithm()

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Orthophoto (raster file)"))
        self.addParameter(QgsProcessingParameterBand(
            self.BANDS, "Red, green and blue bands, in that order (empty: 1, 2, 3)", defaultValue=[1, 2, 3],
            parentLayerParameterName=self.INPUT, optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, "Extent to segment (empty: the whole raster)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.MASK, "Mask: segment only inside these polygons", [POLYGON_LAYERS], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.RESOLUTION, "Resolution to segment at, in metres per pixel (0: the raster's own)",
            DOUBLE, defaultValue=0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterEnum(
            self.MODEL, "DINOv3 model", options=list(MODEL_NAMES), defaultValue=DEFAULT_MODEL,
            usesStaticStrings=True))
        self._add_advanced(QgsProcessingParameterString(
            self.MODEL_ID, "Model: a Hugging Face id or a local folder in Hugging Face format "
            "(overrides the model above)", optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.STRIDE, "Stride in pixels (8 costs 4 × the time of 16, 4 costs 16 ×)", options=list(STRIDES),
            defaultValue=STRIDES[0], usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.CLUSTERS, "Number of clusters (0: automatic)", INTEGER, defaultValue=0, minValue=0,
            maxValue=250))
        self._add_advanced(QgsProcessingParameterNumber(
            self.K_MIN, "Automatic clusters: minimum", INTEGER, defaultValue=2, minValue=1, maxValue=250))
        self._add_advanced(QgsProcessingParameterNumber(
            self.K_MAX, "Automatic clusters: maximum", INTEGER, defaultValue=8, minValue=1, maxValue=250))
        self.addParameter(QgsProcessingParameterEnum(
            self.DEVICE, "Device", options=list(DEVICES), defaultValue=DEVICES[0], usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterBoolean(
            self.ALLOW_UNTRAINED, "Allow untrained (random) weights when the real ones cannot be loaded "
            "(pipeline check only)", defaultValue=False))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_CLUSTERS, "Clusters"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_TREES, "Tree mask"))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, "Polygons (GeoPackage)", POLYGON_LAYERS))
        self.addOutput(QgsProcessingOutputNumber(self.K, "Number of clusters"))
        self.addOutput(QgsProcessingOutputNumber(self.TREE_COVER, "Tree cover (fraction of valid pixels)"))
        self.addOutput(QgsProcessingOutputString(self.MODEL_USED, "Model used"))
        self.addOutput(QgsProcessingOutputBoolean(self.UNTRAINED, "Untrained weights were used"))
        self.addOutput(QgsProcessingOutputFile(self.RUN_RECORD, "Run record (JSON)"))

    def _add_advanced(self, parameter: QgsProcessingParameterDefinition) -> None:
        parameter.setFlags(parameter.flags() | ADVANCED)
        self.addParameter(parameter)

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python = find_engine_python(QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str) or None)
        if python is None:
            raise QgsProcessingException(missing_engine_message())
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, self.INPUT))
        clusters = self._file_destination(parameters, self.OUTPUT_CLUSTERS, context, (".tif", ".tiff"))
        trees = self._file_destination(parameters, self.OUTPUT_TREES, context, (".tif", ".tiff"))
        polygons = self._file_destination(parameters, self.OUTPUT_POLYGONS, context, (".gpkg",))
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        input_path = prepare_input(
            layer, None if extent.isNull() else extent, self.parameterAsSource(parameters, self.MASK, context),
            self.parameterAsDouble(parameters, self.RESOLUTION, context), context,
            Path(QgsProcessingUtils.tempFolder()) / "treeseg",
        )
        clusters_stem = Path(clusters).with_suffix("")
        params = {
            "input_path": input_path,
            "output_dir": str(Path(clusters).parent),
            "bands": self.parameterAsInts(parameters, self.BANDS, context) or [1, 2, 3],
            "model": self.parameterAsString(parameters, self.MODEL_ID, context).strip()
            or self.parameterAsEnumString(parameters, self.MODEL, context),
            "stride": int(self.parameterAsEnumString(parameters, self.STRIDE, context)),
            "clusters": self.parameterAsInt(parameters, self.CLUSTERS, context) or None,
            "k_min": self.parameterAsInt(parameters, self.K_MIN, context),
            "k_max": self.parameterAsInt(parameters, self.K_MAX, context),
            "device": self.parameterAsEnumString(parameters, self.DEVICE, context),
            "allow_untrained": self.parameterAsBoolean(parameters, self.ALLOW_UNTRAINED, context),
            "output_stem": clusters_stem.name,
            "clusters_path": clusters,
            "trees_path": trees,
            "polygons_path": polygons,
            "preview_path": f"{clusters_stem}_preview.png",
            "record_path": f"{clusters_stem}_run.json",
        }
        record = _run_engine(python, params, feedback)
        outputs = record["outputs"]
        untrained = bool(record["model"]["untrained"])
        self._name_layers(context, layer.name(), untrained, outputs)
        return {
            self.OUTPUT_CLUSTERS: outputs["clusters"],
            self.OUTPUT_TREES: outputs["trees"],
            self.OUTPUT_POLYGONS: outputs["polygons"],
            self.K: record["clusters"]["k"],
            self.TREE_COVER: record["trees"]["tree_cover"],
            self.MODEL_USED: record["model"]["model_id"],
            self.UNTRAINED: untrained,
            self.RUN_RECORD: outputs["record"],
        }

    def _file_destination(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                          suffixes: tuple[str, ...]) -> str:
        """The destination's file path, with the extension of the format the engine writes."""
        requested = self.parameterAsOutputLayer(parameters, name, context)
        if NON_FILE_DESTINATION.match(requested):
            raise QgsProcessingException(
                f"{self.parameterDefinition(name).description()}: save to a {suffixes[0]} file, "
                "not into a database or a temporary layer.")
        if Path(requested).suffix.lower() in suffixes:
            return requested
        actual = str(Path(requested).with_suffix(suffixes[0]))
        if context.willLoadLayerOnCompletion(requested):
            layers = context.layersToLoadOnCompletion()
            layers[actual] = layers.pop(requested)
            context.setLayersToLoadOnCompletion(layers)
        return actual

    @staticmethod
    def _name_layers(context: QgsProcessingContext, input_name: str, untrained: bool,
                     outputs: dict[str, str]) -> None:
        """Readable names for the layers the toolbox adds to the project."""
        suffix = " (UNTRAINED)" if untrained else ""
        for kind, label in (("clusters", "clusters"), ("trees", "trees"), ("polygons", "tree polygons")):
            if context.willLoadLayerOnCompletion(outputs[kind]):
                details = context.layerToLoadOnCompletionDetails(outputs[kind])
                details.name = f"{label} — {input_name}{suffix}"
                details.forceName = True


def _run_engine(python: str, params: dict[str, Any], feedback: QgsProcessingFeedback) -> dict[str, Any]:
    """Run one job in a fresh engine worker, reporting to `feedback`; the run record or a QgsProcessingException."""
    last_stage = ""

    def on_progress(percent: float, stage: str) -> None:
        nonlocal last_stage
        feedback.setProgress(percent)
        if stage != last_stage:
            last_stage = stage
            feedback.setProgressText(stage)

    def on_log(level: str, message: str) -> None:
        if level in ("warning", "error", "critical"):
            feedback.pushWarning(message)
        else:
            feedback.pushInfo(message)

    client = EngineClient(python)
    try:
        return client.segment(params, on_progress=on_progress, on_log=on_log, is_cancelled=feedback.isCanceled,
                              hf_token=os.environ.get("HF_TOKEN") or None)
    except EngineError as error:
        raise QgsProcessingException(str(error)) from error
    finally:
        client.close()
