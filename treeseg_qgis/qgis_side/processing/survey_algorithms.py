"""Surveys in Processing: `treeseg:fitclustermodel` (one cluster model from several rasters),
`treeseg:applyclustermodel` (segment one raster with it: the same cluster ids and legend in every raster) and
`treeseg:applyclassifier` (a taught classifier applied to one raster of the survey: the same classes and legend;
the batch dialog runs it over many).

Both run in the engine worker process; nothing here imports torch or the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
)

from ...run_record import ClassesRecord
from ..auth import hf_token
from ..compat import RASTER_LAYERS
from ..raster_input import absolute_file, raster_file
from ..results import OutputGroup, style_loaded_outputs
from .engine_algorithm import (
    WEIGHTS_HELP,
    Declared,
    EngineAlgorithm,
    Value,
    clustering_parameters,
    engine_python,
    feature_parameters,
    orthophoto_parameter,
    read_file,
    run_in_engine,
)
from .segment_trees import SegmentTreesAlgorithm
from .teach_trees import ClassOutputsAlgorithm, teach_params

MODEL_SUFFIX = ".treeseg"
FIT_HELP = """<p>Fits <b>one</b> clustering on a feature sample drawn from all the chosen rasters (in
proportion to their valid area) and saves it as a small <i>.treeseg</i> file: the model, stride, precision,
bands, the PCA, the cluster centres, K and the tree rule. <b>Apply a cluster model</b> then labels any raster
of the survey with the same cluster ids and legend, so cluster 2 means the same thing in every file.</p>
<p>The rasters must share their band layout and data type. The command line runs the same on many
rasters at once, also on a Dask cluster: <i>python -m treeseg_qgis segment-many</i>.</p>""" + WEIGHTS_HELP
APPLY_HELP = """<p>Segments one raster with a saved cluster model (<b>Fit a cluster model on several
rasters</b>): nothing is refitted, so every raster of the survey gets the same cluster ids, tree clusters
and legend. The model, stride, precision and bands must be those the model was fitted with; a raster or
settings that differ are refused, naming what differs.</p>""" + WEIGHTS_HELP


def cluster_model_parameter() -> Declared:
    """CLUSTER_MODEL, a survey's saved cluster model, which the algorithms that apply one take after the input."""
    return Declared(QgsProcessingParameterFile("CLUSTER_MODEL", "Cluster model (.treeseg)",
                                               extension=MODEL_SUFFIX.lstrip(".")), "cluster_model", read_file)


class FitClusterModelAlgorithm(EngineAlgorithm):
    """One survey cluster model from several rasters, fitted by the engine worker."""

    NAME = "fitclustermodel"
    DISPLAY_NAME = "Fit a cluster model on several rasters"
    GROUP = "Surveys"
    TAGS = ("survey", "cluster model", "legend", "mosaic", "tiles", "dinov3", "clustering")
    HELP = FIT_HELP

    INPUTS = "INPUTS"
    OUTPUT = "OUTPUT"
    VALUES = (Value(OUTPUT, ("cluster_model",)), Value("K", ("k",), QgsProcessingOutputNumber, "Number of clusters"))

    def declare(self) -> list[Declared]:
        return [
            Declared(QgsProcessingParameterMultipleLayers(
                self.INPUTS, "Survey orthophotos (raster files)", RASTER_LAYERS)),
            *clustering_parameters(),
            Declared(QgsProcessingParameterFileDestination(
                self.OUTPUT, "Cluster model", fileFilter=f"TreeSeg cluster model (*{MODEL_SUFFIX})")),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python = engine_python()
        layers = self.parameterAsLayerList(parameters, self.INPUTS, context)
        if not layers:
            raise QgsProcessingException("Choose the rasters of the survey.")
        inputs = [raster_file(layer) for layer in layers]
        out_path = absolute_file(self.parameterAsFileOutput(parameters, self.OUTPUT, context))
        if Path(out_path).suffix.lower() != MODEL_SUFFIX:
            out_path = str(Path(out_path).with_suffix(MODEL_SUFFIX))
        if out_path in inputs:
            raise QgsProcessingException("The cluster model would overwrite an input: choose another file.")
        params = self.read_params(parameters, context, input_path=inputs[0], output_dir=str(Path(out_path).parent))
        self.check_params(params, kinds=(), inputs=tuple(inputs))
        record = run_in_engine(python, feedback, lambda client, watch: client.fit(
            inputs, out_path, params, watch, hf_token=hf_token()))
        feedback.pushInfo(f"K={record.k}, tree clusters {record.tree_clusters}, from {len(inputs)} rasters")
        return self.results(record)


class ApplyClusterModelAlgorithm(SegmentTreesAlgorithm):
    """Segment trees with a saved survey cluster model instead of fitting the clusters."""

    NAME = "applyclustermodel"
    DISPLAY_NAME = "Apply a cluster model"
    GROUP = "Surveys"
    TAGS = ("survey", "cluster model", "legend", "trees", "segmentation", "dinov3")
    HELP = APPLY_HELP

    FITTED_BY_THE_MODEL = ("clusters", "k_min", "k_max", "tree_clusters")

    def declare(self) -> list[Declared]:
        """Segment trees' parameters without those filling the fields the model fixes (K, its range, the tree
        clusters), with the model file after the input."""
        inherited = [item for item in super().declare() if item.field not in self.FITTED_BY_THE_MODEL]
        return [inherited[0], cluster_model_parameter(), *inherited[1:]]


CLASSIFIER_HELP = """<p>Applies a <b>taught classifier</b> to one raster of a survey: a <i>.treeseg</i> file
kept by <i>python -m treeseg_qgis teach … --cluster-model SURVEY --save-classifier FILE</i>. Nothing is taught
again, so every raster gets the same classes, class values and colours: one legend. Run it on many rasters with
the batch dialog (right-click the algorithm ▸ Execute as Batch Process), or all at once on the command line:
<i>segment-many … --cluster-model SURVEY --classifier FILE</i>.</p>
<h3>Inputs</h3>
<ul>
<li><b>Cluster model</b>: the survey cluster model the classifier was taught with (its PCA makes every
raster's features alike); another one is refused.</li>
<li><b>Taught classifier</b>: the file; a damaged or edited one is refused, saying so.</li>
<li>The model, stride, precision and bands must be those of the cluster model.</li>
</ul>
<h3>Outputs</h3>
<ul>
<li><b>Classes</b>: a paletted GeoTIFF, 1.. the classes (category names are the class names), 0 = unsure,
255 = nodata.</li>
<li><b>Class probabilities</b>: one band per class. <b>Class polygons</b>: a GeoPackage with a <i>class</i>
field.</li>
<li>A classifier of one class writes its probability and mask beside the Classes file instead (named after the
class; the log lists them).</li>
</ul>""" + WEIGHTS_HELP


class ApplyClassifierAlgorithm(ClassOutputsAlgorithm):
    """A saved taught classifier applied to one raster of a survey, through the engine worker."""

    NAME = "applyclassifier"
    DISPLAY_NAME = "Apply a taught classifier"
    GROUP = "Surveys"
    TAGS = ("survey", "classifier", "classes", "legend", "teach", "dead trees", "batch", "dinov3")
    HELP = CLASSIFIER_HELP

    CLASSIFIER = "CLASSIFIER"

    def declare(self) -> list[Declared]:
        return [
            orthophoto_parameter(),
            cluster_model_parameter(),
            Declared(QgsProcessingParameterFile(
                self.CLASSIFIER, "Taught classifier (.treeseg)", extension=MODEL_SUFFIX.lstrip("."))),
            *feature_parameters(),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        python, layer = self.engine_and_input(parameters, context)
        classifier = read_file(self, parameters, self.CLASSIFIER, context)
        if not classifier:
            raise QgsProcessingException("Choose the taught classifier file.")
        params = teach_params(self, parameters, context, layer, inputs=(classifier,))
        record = run_in_engine(python, feedback, lambda client, watch: client.teach(
            params, [], None, watch, hf_token=hf_token(), classifier=classifier))
        if record.warning:
            feedback.pushWarning(record.warning)
        if isinstance(record, ClassesRecord):
            covers = ", ".join(f"{name} {100 * cover:.1f} %" for name, cover in record.class_cover.items())
            feedback.pushInfo(f"Classes of {Path(classifier).name}: {covers}; feature cache: "
                              f"{record.feature_cache}.")
        else:
            feedback.pushInfo(f"One class, {record.class_name}: cover {100 * record.tree_cover:.1f} %; written to "
                              + ", ".join(record.outputs.values()))
        style_loaded_outputs(context, record, OutputGroup.for_teach(record, layer.name()))
        return self.results(record)
