"""The Processing algorithm `treeseg:segmenttrees`: one segmentation run through the engine worker.

Nothing here imports torch or the engine's core: the parameters become a plain
dict with the keys of SegmentationParams, and the engine worker process
(engine_client.EngineClient) does the work, so the algorithm loads and explains
itself even where the engine environment is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
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

from ...catalogue import HEIGHT_HEAD
from ...outputs import OutputPathError, check_run_paths
from ..auth import hf_token
from ..compat import DOUBLE, INTEGER, POLYGON_LAYERS
from ..raster_input import prepare_input
from ..results import RUN_OUTPUT_ORDER, OutputGroup, group_name, style_loaded_outputs
from .engine_algorithm import (
    GEOPACKAGE_SUFFIXES,
    RASTER_SUFFIXES,
    WEIGHTS_HELP,
    EngineAlgorithm,
    engine_python,
    help_html,
    run_in_engine,
)

METHODS = ("dinov3", "rgb-kmeans", "exg-otsu")
DEFAULT_HEIGHT_MODEL = HEIGHT_HEAD.repo_id
HEIGHT_MODEL_PAGE = f"https://huggingface.co/{DEFAULT_HEIGHT_MODEL}"

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
                "clustering", "unsupervised", "deep learning", "ai", "crowns", "height"]

    def shortHelpString(self) -> str:
        return help_html(HELP)

    def createInstance(self) -> SegmentTreesAlgorithm:
        return SegmentTreesAlgorithm()

    def extra_params(self, parameters: dict[str, Any], context: QgsProcessingContext) -> dict[str, Any]:
        """Parameters a derived algorithm sets or replaces (Apply a cluster model: the model file)."""
        return {}

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Orthophoto (raster file)"))
        self.addParameter(QgsProcessingParameterBand(
            self.BANDS, "RGB bands", defaultValue=[1, 2, 3], parentLayerParameterName=self.INPUT, optional=True,
            allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.MASK, "Mask polygons", [POLYGON_LAYERS], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.RESOLUTION, "Resolution (m/px, 0: native)", DOUBLE, defaultValue=0.0, minValue=0.0))
        self.add_model_parameters()
        self.addParameter(QgsProcessingParameterNumber(
            self.CLUSTERS, "Clusters (0: automatic)", INTEGER, defaultValue=0, minValue=0, maxValue=250))
        self.add_device_parameters()
        self.add_advanced(QgsProcessingParameterEnum(
            self.METHOD, "Method (or a colour baseline)", options=list(METHODS), defaultValue=METHODS[0],
            usesStaticStrings=True))
        self.add_advanced(QgsProcessingParameterNumber(
            self.K_MIN, "Automatic clusters: minimum", INTEGER, defaultValue=2, minValue=1, maxValue=250))
        self.add_advanced(QgsProcessingParameterNumber(
            self.K_MAX, "Automatic clusters: maximum", INTEGER, defaultValue=8, minValue=1, maxValue=250))
        self.add_advanced(QgsProcessingParameterString(self.TREE_CLUSTERS, "Tree clusters (ids)", optional=True))
        self.add_advanced(QgsProcessingParameterNumber(
            self.CROWN_MIN_AREA, "Minimum crown area (m²)", DOUBLE, defaultValue=2.0, minValue=0.0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.MIN_TREE_HEIGHT, "Minimum tree height (m, 0: off)", DOUBLE, defaultValue=0.0, minValue=0.0))
        self.add_advanced(QgsProcessingParameterString(
            self.HEIGHT_MODEL, "Canopy-height model", defaultValue=DEFAULT_HEIGHT_MODEL))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_CLUSTERS, "Clusters"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_TREES, "Tree mask"))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, "Polygons", POLYGON_LAYERS))
        self.add_advanced(QgsProcessingParameterVectorDestination(
            self.OUTPUT_CROWNS, "Tree crowns", POLYGON_LAYERS, optional=True, createByDefault=False))
        self.add_advanced(QgsProcessingParameterRasterDestination(
            self.OUTPUT_FEATURES, "Feature image", optional=True, createByDefault=False))
        self.add_advanced(QgsProcessingParameterRasterDestination(
            self.OUTPUT_HEIGHT, "Canopy height", optional=True, createByDefault=False))
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
        tree_clusters = parse_tree_clusters(self.parameterAsString(parameters, self.TREE_CLUSTERS, context))
        min_tree_height = self.parameterAsDouble(parameters, self.MIN_TREE_HEIGHT, context) or None
        clusters_stem = Path(clusters).with_suffix("")
        if height is None and min_tree_height is not None:
            height_path = QgsProcessingUtils.generateTempFilename(f"{clusters_stem.name}_height.tif")
        else:
            height_path = height
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        input_path = prepare_input(
            layer, None if extent.isNull() else extent, self.parameterAsSource(parameters, self.MASK, context),
            self.parameterAsDouble(parameters, self.RESOLUTION, context), context,
            Path(QgsProcessingUtils.tempFolder()) / "treeseg",
        )
        params = {
            "input_path": input_path,
            "output_dir": str(Path(clusters).parent),
            "method": self.parameterAsEnumString(parameters, self.METHOD, context),
            "bands": self.parameterAsInts(parameters, self.BANDS, context) or [1, 2, 3],
            **self.model_params(parameters, context),
            "clusters": self.parameterAsInt(parameters, self.CLUSTERS, context) or None,
            "k_min": self.parameterAsInt(parameters, self.K_MIN, context),
            "k_max": self.parameterAsInt(parameters, self.K_MAX, context),
            "tree_clusters": tree_clusters,
            "crowns": crowns is not None,
            "crown_min_area_m2": self.parameterAsDouble(parameters, self.CROWN_MIN_AREA, context),
            "feature_preview": features is not None,
            "canopy_height": height is not None,
            "min_tree_height_m": min_tree_height,
            "height_model": self.parameterAsString(parameters, self.HEIGHT_MODEL, context).strip()
            or DEFAULT_HEIGHT_MODEL,
            "output_stem": clusters_stem.name,
            "clusters_path": clusters,
            "trees_path": trees,
            "polygons_path": polygons,
            "crowns_path": crowns,
            "features_path": features,
            "height_path": height_path,
            "preview_path": f"{clusters_stem}_preview.png",
            "record_path": f"{clusters_stem}_run.json",
            **self.extra_params(parameters, context),
        }
        try:
            check_run_paths(params, inputs=(layer.source(),))
        except OutputPathError as error:
            raise QgsProcessingException(str(error)) from None
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


def parse_tree_clusters(text: str) -> list[int] | None:
    """Cluster ids such as "0, 3" as a list; None for empty text; a QgsProcessingException otherwise."""
    if not text.strip():
        return None
    try:
        ids = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(not 0 <= cluster < 250 for cluster in ids):
        raise QgsProcessingException(
            f"Tree clusters '{text}' is not a list of cluster ids: give numbers between 0 and 249 separated "
            "by commas, e.g. 0,3, or leave it empty for the greenness rule.")
    return sorted(set(ids))
