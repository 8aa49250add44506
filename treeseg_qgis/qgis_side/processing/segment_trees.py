"""The Processing algorithm `treeseg:segmenttrees`: one segmentation run through the engine worker.

Nothing here imports torch or the engine's core: the declared parameters become a
SegmentationParams (engine_algorithm.EngineAlgorithm reads and validates them), and the engine
worker process (engine_client.EngineClient) does the work, so the algorithm loads and explains
itself even where the engine environment is missing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputBoolean,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
)

from ...params import DEFAULT_K_RANGE, K_MAX, METHODS, OutputFiles, SegmentationParams
from ..auth import hf_token
from ..compat import DOUBLE, INTEGER, POLYGON_LAYERS
from ..raster_input import prepare_input
from ..results import RUN_OUTPUT_ORDER, OutputGroup, group_name, style_loaded_outputs
from .engine_algorithm import (
    GEOPACKAGE_SUFFIXES,
    RASTER_SUFFIXES,
    WEIGHTS_HELP,
    Declared,
    EngineAlgorithm,
    device_parameters,
    engine_python,
    model_parameters,
    read_bands,
    read_choice,
    read_cluster_ids,
    read_clusters,
    read_int,
    read_number,
    read_number_zero_off,
    read_text,
    run_in_engine,
)

DEFAULT_HEIGHT_MODEL = SegmentationParams.height_model
HEIGHT_MODEL_PAGE = f"https://huggingface.co/{DEFAULT_HEIGHT_MODEL}"

HELP_TEXT = f"""<p>Segments trees in a drone or aerial orthophoto <b>without training labels</b>: a DINOv3
vision transformer describes every 16 × 16 pixel patch, the descriptions are clustered, and the
clusters that are green enough are called trees.</p>
<h3>Outputs</h3>
<ul>
<li><b>Clusters</b>: a GeoTIFF with the cluster id of every pixel (255 = nodata), on the grid of the
input (or of the extent / resolution you chose).</li>
<li><b>Tree mask</b>: a GeoTIFF, 1 = tree, 0 = not tree, 255 = nodata.</li>
<li><b>Polygons</b>: a GeoPackage with one polygon per connected region and the fields
<i>cluster</i>, <i>is_tree</i> and <i>area_m2</i>.</li>
<li><b>Tree crowns</b> (optional): a GeoPackage with one polygon per crown (watershed of the tree
mask) and the fields <i>crown_id</i>, <i>cluster</i>, <i>area_m2</i>, <i>perimeter_m</i>,
<i>diameter_m</i>, <i>centroid_x</i>, <i>centroid_y</i>; crowns smaller than the minimum crown area
are dropped.</li>
<li><b>Feature image</b> (optional, advanced): the first three principal components of the features
as RGB: what DINOv3 tells apart.</li>
<li><b>Canopy height</b> (optional, advanced): metres per pixel from the DINOv3 canopy-height head
(CHMv2).</li>
<li>Beside the clusters file: a preview image (<i>_preview.png</i>), a run record
(<i>_run.json</i>) with the model used, K, the tree rule and the timings, and with automatic K the
elbow plot (<i>_elbow.png</i>). The number of clusters,
the tree cover, the number of crowns and the model are also returned for use in a model.</li>
</ul>
<h3>Parameters worth knowing</h3>
<ul>
<li><b>RGB bands</b>: red, green and blue, in that order (one band is read as grey); empty: 1, 2, 3.</li>
<li><b>Extent</b> (empty: the whole raster), <b>Mask polygons</b> (segment only inside them) and
<b>Resolution</b> (metres per pixel; 0: the raster's own) are applied on the fly without copying the
raster; pixels outside the mask are nodata. The raster must be a file: export web layers (WMS, XYZ)
to a GeoTIFF first.</li>
<li><b>Clusters</b>: 0 picks K automatically (elbow of the k-means inertia between the minimum and
maximum).</li>
<li><b>Tree clusters</b> (advanced): cluster ids to call trees, e.g. <i>0,3</i>, instead of the
greenness rule (look at the clusters of a first run); empty: the greenness rule.</li>
<li><b>Minimum tree height</b> (advanced): tree pixels lower than this are dropped, which separates
trees from grass and shrubs of the same colour; the canopy height is then computed even when its
output is not asked for. 0: off.</li>
<li><b>Precision</b> (advanced): what the model runs in. <i>auto</i>: float32, the reference, on the CPU
and half precision on a GPU; <i>bfloat16</i> and <i>int8</i> are faster on the CPU and keep the features
closely but not exactly (see the benchmarks).</li>
<li><b>Canopy-height model</b> (advanced): a Hugging Face id or a local folder of a CHMv2 model.</li>
<li><b>Method</b> (advanced): <i>rgb-kmeans</i> and <i>exg-otsu</i> are colour baselines for
comparison (k-means on the colours; Otsu's threshold on the excess-green index): they show what the
DINOv3 features add.</li>
</ul>
{WEIGHTS_HELP}
<p>The canopy-height model is gated too: accept its licence on
<a href="{HEIGHT_MODEL_PAGE}">{HEIGHT_MODEL_PAGE}</a> before asking for the height.</p>"""


class SegmentTreesAlgorithm(EngineAlgorithm):
    """Segment trees in an orthophoto with DINOv3 features, through the engine worker process."""

    NAME = "segmenttrees"
    DISPLAY_NAME = "Segment trees (DINOv3)"
    GROUP = "Segmentation"
    GROUP_ID = "segmentation"
    TAGS = ("trees", "tree", "canopy", "forest", "segmentation", "dinov3", "orthophoto", "drone",
            "clustering", "unsupervised", "deep learning", "ai", "crowns", "height")
    HELP = HELP_TEXT

    INPUT = "INPUT"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    MASK = "MASK"
    RESOLUTION = "RESOLUTION"
    METHOD = "METHOD"
    CLUSTERS = "CLUSTERS"
    K_MIN = "K_MIN"
    K_MAX = "K_MAX"
    TREE_CLUSTERS = "TREE_CLUSTERS"
    CROWN_MIN_AREA = "CROWN_MIN_AREA"
    MIN_TREE_HEIGHT = "MIN_TREE_HEIGHT"
    HEIGHT_MODEL = "HEIGHT_MODEL"
    OUTPUT_CLUSTERS = "OUTPUT_CLUSTERS"
    OUTPUT_TREES = "OUTPUT_TREES"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"
    OUTPUT_CROWNS = "OUTPUT_CROWNS"
    OUTPUT_FEATURES = "OUTPUT_FEATURES"
    OUTPUT_HEIGHT = "OUTPUT_HEIGHT"
    K = "K"
    TREE_COVER = "TREE_COVER"
    CROWNS = "CROWNS"
    MODEL_USED = "MODEL_USED"
    UNTRAINED = "UNTRAINED"
    RUN_RECORD = "RUN_RECORD"

    def declare(self) -> list[Declared]:
        return [
            Declared(QgsProcessingParameterRasterLayer(self.INPUT, "Orthophoto (raster file)")),
            Declared(QgsProcessingParameterBand(
                self.BANDS, "RGB bands", defaultValue=[1, 2, 3], parentLayerParameterName=self.INPUT, optional=True,
                allowMultiple=True), "bands", read_bands),
            Declared(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True)),
            Declared(QgsProcessingParameterFeatureSource(self.MASK, "Mask polygons", [POLYGON_LAYERS], optional=True)),
            Declared(QgsProcessingParameterNumber(
                self.RESOLUTION, "Resolution (m/px, 0: native)", DOUBLE, defaultValue=0.0, minValue=0.0)),
            *model_parameters(),
            Declared(QgsProcessingParameterNumber(
                self.CLUSTERS, "Clusters (0: automatic)", INTEGER, defaultValue=0, minValue=0, maxValue=K_MAX),
                "clusters", read_clusters),
            *device_parameters(),
            Declared(QgsProcessingParameterEnum(
                self.METHOD, "Method (or a colour baseline)", options=list(METHODS), defaultValue=METHODS[0],
                usesStaticStrings=True), "method", read_choice, advanced=True),
            Declared(QgsProcessingParameterNumber(
                self.K_MIN, "Automatic clusters: minimum", INTEGER, defaultValue=DEFAULT_K_RANGE[0], minValue=1,
                maxValue=K_MAX), "k_min", read_int, advanced=True),
            Declared(QgsProcessingParameterNumber(
                self.K_MAX, "Automatic clusters: maximum", INTEGER, defaultValue=DEFAULT_K_RANGE[1], minValue=1,
                maxValue=K_MAX), "k_max", read_int, advanced=True),
            Declared(QgsProcessingParameterString(self.TREE_CLUSTERS, "Tree clusters (ids)", optional=True),
                     "tree_clusters", read_cluster_ids, advanced=True),
            Declared(QgsProcessingParameterNumber(
                self.CROWN_MIN_AREA, "Minimum crown area (m²)", DOUBLE,
                defaultValue=SegmentationParams.crown_min_area_m2, minValue=0.0),
                "crown_min_area_m2", read_number, advanced=True),
            Declared(QgsProcessingParameterNumber(
                self.MIN_TREE_HEIGHT, "Minimum tree height (m, 0: off)", DOUBLE, defaultValue=0.0, minValue=0.0),
                "min_tree_height_m", read_number_zero_off, advanced=True),
            Declared(QgsProcessingParameterString(
                self.HEIGHT_MODEL, "Canopy-height model", defaultValue=DEFAULT_HEIGHT_MODEL),
                "height_model", read_text, advanced=True),
            Declared(QgsProcessingParameterRasterDestination(self.OUTPUT_CLUSTERS, "Clusters")),
            Declared(QgsProcessingParameterRasterDestination(self.OUTPUT_TREES, "Tree mask")),
            Declared(QgsProcessingParameterVectorDestination(self.OUTPUT_POLYGONS, "Polygons", POLYGON_LAYERS)),
            Declared(QgsProcessingParameterVectorDestination(
                self.OUTPUT_CROWNS, "Tree crowns", POLYGON_LAYERS, optional=True, createByDefault=False),
                advanced=True),
            Declared(QgsProcessingParameterRasterDestination(
                self.OUTPUT_FEATURES, "Feature image", optional=True, createByDefault=False), advanced=True),
            Declared(QgsProcessingParameterRasterDestination(
                self.OUTPUT_HEIGHT, "Canopy height", optional=True, createByDefault=False), advanced=True),
        ]

    def declare_outputs(self) -> None:
        self.addOutput(QgsProcessingOutputNumber(self.K, "Number of clusters"))
        self.addOutput(QgsProcessingOutputNumber(self.TREE_COVER, "Tree cover (fraction of valid pixels)"))
        self.addOutput(QgsProcessingOutputNumber(self.CROWNS, "Number of tree crowns"))
        self.addOutput(QgsProcessingOutputString(self.MODEL_USED, "Model used"))
        self.addOutput(QgsProcessingOutputBoolean(self.UNTRAINED, "Untrained weights were used"))
        self.addOutput(QgsProcessingOutputFile(self.RUN_RECORD, "Run record (JSON)"))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python = engine_python()
        layer = self.input_raster(parameters, self.INPUT, context)
        clusters = self.file_destination(parameters, self.OUTPUT_CLUSTERS, context, RASTER_SUFFIXES)
        trees = self.file_destination(parameters, self.OUTPUT_TREES, context, RASTER_SUFFIXES)
        polygons = self.file_destination(parameters, self.OUTPUT_POLYGONS, context, GEOPACKAGE_SUFFIXES)
        crowns = self.optional_file_destination(parameters, self.OUTPUT_CROWNS, context, GEOPACKAGE_SUFFIXES)
        features = self.optional_file_destination(parameters, self.OUTPUT_FEATURES, context, RASTER_SUFFIXES)
        height = self.optional_file_destination(parameters, self.OUTPUT_HEIGHT, context, RASTER_SUFFIXES)
        stem = Path(clusters).with_suffix("")
        params = self.read_params(
            parameters, context, input_path=layer.source(), output_dir=str(stem.parent), output_stem=stem.name,
            crowns=crowns is not None, feature_preview=features is not None, canopy_height=height is not None,
            outputs=OutputFiles(clusters=clusters, trees=trees, polygons=polygons, crowns=crowns, features=features,
                                height=height, preview=f"{stem}_preview.png", record=f"{stem}_run.json"))
        if height is None and params.min_tree_height_m is not None:  # the height is needed, not asked for
            params = replace(params, outputs=replace(params.outputs, height=QgsProcessingUtils.generateTempFilename(
                f"{stem.name}_height.tif")))
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        params = replace(params, input_path=prepare_input(
            layer, None if extent.isNull() else extent, self.parameterAsSource(parameters, self.MASK, context),
            self.parameterAsDouble(parameters, self.RESOLUTION, context), context,
            Path(QgsProcessingUtils.tempFolder()) / "treeseg",
        ))
        self.check_params(params, inputs=(layer.source(),))
        record = run_in_engine(python, feedback, lambda client, report: client.segment(
            params, on_progress=report.progress, on_log=report.log, is_cancelled=feedback.isCanceled,
            hf_token=hf_token()))
        outputs = record["outputs"]
        untrained = bool(record["model"]["untrained"])
        style_loaded_outputs(context, record, OutputGroup(group_name(record, layer.name()), RUN_OUTPUT_ORDER))
        results = {
            self.OUTPUT_CLUSTERS: outputs["clusters"],
            self.OUTPUT_TREES: outputs["trees"],
            self.OUTPUT_POLYGONS: outputs["polygons"],
            self.K: record["clusters"]["k"],
            self.TREE_COVER: record["trees"]["tree_cover"],
            self.MODEL_USED: record["model"]["model_id"],
            self.UNTRAINED: untrained,
            self.RUN_RECORD: outputs["record"],
        }
        for kind, output in (("crowns", self.OUTPUT_CROWNS), ("features", self.OUTPUT_FEATURES),
                             ("height", self.OUTPUT_HEIGHT)):
            if kind in outputs:
                results[output] = outputs[kind]
        if record.get("crowns") is not None:
            results[self.CROWNS] = record["crowns"]
        return results
