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
    QgsProcessingParameterString,
    QgsProcessingUtils,
)

from ...params import COLOUR_STRIDES, DEFAULT_K_RANGE, K_MAX, METHODS, OutputFiles, SegmentationParams
from ..auth import hf_token
from ..compat import DOUBLE, INTEGER, POLYGON_LAYERS
from ..raster_input import prepare_input, raster_file
from ..results import OutputGroup, style_loaded_outputs
from .engine_algorithm import (
    CROWN_COUNT,
    WEIGHTS_HELP,
    Declared,
    Destination,
    EngineAlgorithm,
    Value,
    clustering_parameters,
    orthophoto_parameter,
    read_bands,
    read_choice,
    read_cluster_ids,
    read_int,
    read_model,
    read_number,
    read_number_zero_off,
    read_stride,
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
<li><b>K</b>, the number of clusters: 0 picks it automatically (elbow of the k-means inertia between the minimum and
maximum).</li>
<li><b>Tree clusters</b> (advanced): cluster ids to call trees, e.g. <i>0,3</i>, instead of the
greenness rule (look at the clusters of a first run); empty: the greenness rule.</li>
<li><b>Minimum tree height</b> (advanced): tree pixels lower than this are dropped, which separates
trees from grass and shrubs of the same colour; the canopy height is then computed even when its
output is not asked for. 0: off.</li>
<li><b>Precision</b> (advanced): what the model runs in. <i>auto</i>: int8 in ONNX Runtime on a CPU with
AVX2 or AVX-512 (about twice as fast; the features kept closely but not exactly, see the benchmarks), else
float32, the reference; half precision on a GPU. <i>float32</i> and <i>bfloat16</i> run only when chosen.</li>
<li><b>Height model</b> (advanced): a Hugging Face id or a local folder of a CHMv2 model.</li>
<li><b>Stride</b>: empty is 16 for DINOv3 and per pixel (1) for the colour baselines, as on the command
line; 2 and 1 are for the colour baselines only.</li>
<li><b>Method</b> (advanced): <i>rgb-kmeans</i> and <i>exg-otsu</i> are colour baselines for
comparison (k-means on the colours; Otsu's threshold on the excess-green index): they show what the
DINOv3 features add.</li>
</ul>
{WEIGHTS_HELP}
<p>The canopy-height model is gated too: accept its licence on
<a href="{HEIGHT_MODEL_PAGE}">{HEIGHT_MODEL_PAGE}</a> before asking for the height.</p>"""


COLOUR_DEFAULT_STRIDE = 1
"""The colour baselines' stride when none is chosen: per pixel (the CLI's default too)."""


def method_stride() -> Declared:
    """STRIDE for a method: 16, 8 or 4 for DINOv3, also 2 and 1 for the colour baselines; empty: the method's
    default (16; per pixel for the colour baselines)."""
    return Declared(QgsProcessingParameterEnum(
        "STRIDE", "Stride (px)", options=[str(stride) for stride in COLOUR_STRIDES], defaultValue=None,
        optional=True, usesStaticStrings=True), "stride", read_stride,
        help="Empty: 16 for DINOv3, per pixel for the colour baselines; 2 and 1 are for the colour baselines only.")


class SegmentTreesAlgorithm(EngineAlgorithm):
    """Segment trees in an orthophoto with DINOv3 features, through the engine worker process."""

    NAME = "segmenttrees"
    DISPLAY_NAME = "Segment trees (DINOv3)"
    GROUP = "Segmentation"
    TAGS = ("trees", "tree", "canopy", "forest", "segmentation", "dinov3", "orthophoto", "drone",
            "clustering", "unsupervised", "deep learning", "ai", "crowns", "height")
    HELP = HELP_TEXT

    EXTENT = "EXTENT"
    MASK = "MASK"
    RESOLUTION = "RESOLUTION"
    DESTINATIONS = (
        Destination("OUTPUT_CLUSTERS", "Clusters", "clusters"),
        Destination("OUTPUT_TREES", "Tree mask", "trees"),
        Destination("OUTPUT_POLYGONS", "Polygons", "polygons"),
        Destination("OUTPUT_CROWNS", "Tree crowns", "crowns", optional=True),
        Destination("OUTPUT_FEATURES", "Feature image", "features", optional=True),
        Destination("OUTPUT_HEIGHT", "Canopy height", "height", optional=True),
    )
    VALUES = (
        Value("K", ("clusters", "k"), QgsProcessingOutputNumber, "Number of clusters"),
        Value("TREE_COVER", ("trees", "tree_cover"), QgsProcessingOutputNumber,
              "Tree cover (fraction of valid pixels)"),
        CROWN_COUNT,
        Value("MODEL_USED", ("model", "model_id"), QgsProcessingOutputString, "Model used"),
        Value("UNTRAINED", ("model", "untrained"), QgsProcessingOutputBoolean, "Untrained weights were used"),
        Value("RUN_RECORD", ("outputs", "record"), QgsProcessingOutputFile, "Run record (JSON)"),
    )

    def declare(self) -> list[Declared]:
        """The parameters; STRIDE may stay empty: 16 for DINOv3, per pixel for a colour baseline, as the CLI."""
        return [
            orthophoto_parameter(),
            Declared(QgsProcessingParameterBand(
                "BANDS", "RGB bands", defaultValue=[1, 2, 3], parentLayerParameterName=self.INPUT, optional=True,
                allowMultiple=True), "bands", read_bands),
            Declared(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True)),
            Declared(QgsProcessingParameterFeatureSource(self.MASK, "Mask polygons", [POLYGON_LAYERS], optional=True)),
            Declared(QgsProcessingParameterNumber(
                self.RESOLUTION, "Resolution (m/px)", DOUBLE, defaultValue=0.0, minValue=0.0),
                help="Metres per pixel the model sees, resampled on the fly; 0: the raster's own."),
            *(method_stride() if item.definition.name() == "STRIDE" else item for item in clustering_parameters()),
            Declared(QgsProcessingParameterEnum(
                "METHOD", "Method", options=list(METHODS), defaultValue=METHODS[0],
                usesStaticStrings=True), "method", read_choice, advanced=True,
                help="dinov3, or a colour baseline for comparison: rgb-kmeans, exg-otsu."),
            Declared(QgsProcessingParameterNumber(
                "K_MIN", "Min. K (auto)", INTEGER, defaultValue=DEFAULT_K_RANGE[0], minValue=1,
                maxValue=K_MAX), "k_min", read_int, advanced=True, help="The fewest clusters automatic K picks."),
            Declared(QgsProcessingParameterNumber(
                "K_MAX", "Max. K (auto)", INTEGER, defaultValue=DEFAULT_K_RANGE[1], minValue=1,
                maxValue=K_MAX), "k_max", read_int, advanced=True, help="The most clusters automatic K picks."),
            Declared(QgsProcessingParameterString("TREE_CLUSTERS", "Tree clusters", optional=True),
                     "tree_clusters", read_cluster_ids, advanced=True,
                     help="Cluster ids to call trees, e.g. 0,3; empty: the greenness rule."),
            Declared(QgsProcessingParameterNumber(
                "CROWN_MIN_AREA", "Min. crown (m²)", DOUBLE,
                defaultValue=SegmentationParams.crown_min_area_m2, minValue=0.0),
                "crown_min_area_m2", read_number, advanced=True, help="Crowns smaller than this are dropped."),
            Declared(QgsProcessingParameterNumber(
                "MIN_TREE_HEIGHT", "Min. tree height (m)", DOUBLE, defaultValue=0.0, minValue=0.0),
                "min_tree_height_m", read_number_zero_off, advanced=True,
                help="Tree pixels lower than this are dropped (the canopy height is then computed); 0: off."),
            Declared(QgsProcessingParameterString(
                "HEIGHT_MODEL", "Height model", defaultValue=DEFAULT_HEIGHT_MODEL),
                "height_model", read_model, advanced=True,
                help="The canopy-height model: a Hugging Face id or a local folder of a CHMv2 model."),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python, layer = self.engine_and_input(parameters, context)
        files = self.output_files(parameters, context)
        stem = Path(files["clusters"]).with_suffix("")
        source = raster_file(layer)
        params = self.read_params(
            parameters, context, input_path=source, output_dir=str(stem.parent), output_stem=stem.name,
            crowns=files["crowns"] is not None, feature_preview=files["features"] is not None,
            canopy_height=files["height"] is not None,
            outputs=OutputFiles(**files, preview=f"{stem}_preview.png", record=f"{stem}_run.json"))
        if params.method != "dinov3" and not self.parameterAsEnumString(parameters, "STRIDE", context):
            params = replace(params, stride=COLOUR_DEFAULT_STRIDE)
        if files["height"] is None and params.min_tree_height_m is not None:  # the height is needed, not asked for
            params = replace(params, outputs=replace(params.outputs, height=QgsProcessingUtils.generateTempFilename(
                f"{stem.name}_height.tif")))
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        params = replace(params, input_path=prepare_input(
            layer, None if extent.isNull() else extent, self.parameterAsSource(parameters, self.MASK, context),
            self.parameterAsDouble(parameters, self.RESOLUTION, context), context,
            Path(QgsProcessingUtils.tempFolder()) / "treeseg",
        ))
        self.check_params(params, inputs=(source,))
        record = run_in_engine(python, feedback, lambda client, watch: client.segment(
            params, watch, hf_token=hf_token()))
        style_loaded_outputs(context, record, OutputGroup.for_run(record, layer.name()))
        return self.results(record)
