"""The Processing algorithm `treeseg:teach`: scores of a class (trees, dead trees…) from a few example points,
through the engine worker.

The points are turned into pixel positions here, on the QGIS side (any CRS, via
the project's transform context); the engine learns a regularised classifier from the
DINOv3 features around the examples and gives every pixel a calibrated class
probability; the threshold is 0.5 unless one is given. Features come from the engine's cache when the raster was
seen before, so a second run with another threshold skips the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureSource,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QVariant

from ...outputs import TEACH_KINDS
from ...params import OutputFiles, SegmentationParams
from ...run_record import TaughtRecord
from ..auth import hf_token
from ..compat import ANY_FIELD, DOUBLE, POINT_LAYERS
from ..raster_input import RasterGrid, raster_file
from ..results import OutputGroup, style_loaded_outputs
from .engine_algorithm import (
    WEIGHTS_HELP,
    Declared,
    Destination,
    EngineAlgorithm,
    Value,
    feature_parameters,
    orthophoto_parameter,
    run_in_engine,
)

EXAMPLES_PARAMETER = "EXAMPLES"
DEFAULT_IS_TREE_FIELD = "is_tree"
CLASS_FIELD = "class"
TRUE_TEXTS = ("1", "true", "t", "yes", "y")
FALSE_TEXTS = ("0", "false", "f", "no", "n")
PixelExample = tuple[float, float, "bool | str"]

HELP_TEXT = f"""<p>Teaches the model a class <b>from a few example points</b>: trees by default, or any
class you name (dead trees, roofs, water…). Put points on some examples of the class (and, better
still, on a few things that are not: soil, grass, live trees) and the DINOv3 features of every pixel
are compared with those of the examples.</p>
<h3>Inputs</h3>
<ul>
<li><b>Example points</b>: a point layer in any CRS with a field that says which points show the class
(1 / true = the class, 0 / false = something else; empty values are skipped). At least one point of
the class must lie on the raster.</li>
<li><b>Class field</b>: that field (empty: <i>is_tree</i>).</li>
<li><b>Class</b>: what the examples show; it names the layers and the record.</li>
<li><b>Threshold</b>: pixels whose class probability is at least this belong to the class. Left empty,
0.5: the probabilities are calibrated on the examples (each is scored by a model taught without it), so
0.5 means "as likely the class as not"; the message says how well the examples agreed. The features are
cached, so running again with another threshold takes seconds (Feature cache: <i>hit</i>).</li>
</ul>
<h3>Outputs</h3>
<ul>
<li><b>Similarity</b>: a GeoTIFF of class probabilities from 0 to 1.</li>
<li><b>Class mask</b>: a GeoTIFF, 1 = the class, 0 = not, 255 = nodata.</li>
<li>Beside the similarity file a record (<i>_teach.json</i>); the class cover, the threshold used and the
feature-cache state are also returned for use in a model.</li>
</ul>
{WEIGHTS_HELP}"""


TEACH_VALUES = (
    Value("FEATURE_CACHE", ("feature_cache",), QgsProcessingOutputString, "Feature cache (hit, miss or off)"),
    Value("TEACH_RECORD", ("outputs", "teach_record"), QgsProcessingOutputFile, "Teach record (JSON)"),
)
"""The values both teach algorithms (and Apply a taught classifier) return."""
CLASS_DESTINATIONS = (
    Destination("OUTPUT_CLASSES", "Classes", "classes"),
    Destination("OUTPUT_CLASS_PROBABILITIES", "Class probabilities", "class_probabilities"),
    Destination("OUTPUT_CLASS_POLYGONS", "Class polygons", "class_polygons"),
)
"""The outputs of a teach of several classes and of a taught classifier applied."""


class ClassOutputsAlgorithm(EngineAlgorithm):
    """Base of the algorithms whose teach job writes the class outputs: several classes taught, a taught
    classifier applied."""

    DESTINATIONS = CLASS_DESTINATIONS
    VALUES = TEACH_VALUES


def teach_params(algorithm: EngineAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext,
                 layer: QgsRasterLayer, inputs: tuple[str, ...] = ()) -> SegmentationParams:
    """The checked parameters of a teach job on `layer` (`inputs`: the files it reads besides): the declared
    parameters and the destinations' files, the teach record beside the first."""
    files = algorithm.output_files(parameters, context)
    stem = Path(files[algorithm.DESTINATIONS[0].kind]).with_suffix("")
    params = algorithm.read_params(parameters, context, input_path=raster_file(layer), output_dir=str(stem.parent),
                                   output_stem=stem.name,
                                   outputs=OutputFiles(**files, teach_record=f"{stem}_teach.json"))
    algorithm.check_params(params, TEACH_KINDS, inputs)
    return params


def example_parameters(field_parameter: str, description: str, default_field: str) -> list[Declared]:
    """The raster, the example points and their field, which both teach algorithms take first; the field is
    optional, so that its default is taken where it is left out (qgis_process, processing.run)."""
    return [
        orthophoto_parameter(),
        Declared(QgsProcessingParameterFeatureSource(EXAMPLES_PARAMETER, "Example points", [POINT_LAYERS])),
        Declared(QgsProcessingParameterField(
            field_parameter, description, defaultValue=default_field, parentLayerParameterName=EXAMPLES_PARAMETER,
            type=ANY_FIELD, optional=True)),
    ]


class TeachTreesAlgorithm(EngineAlgorithm):
    """Class scores and a class mask from example points, through the engine worker process."""

    NAME = "teach"
    DISPLAY_NAME = "Teach trees or any class by example (DINOv3)"
    GROUP = "Segmentation"
    TAGS = ("trees", "tree", "class", "dead trees", "examples", "points", "similarity", "few-shot", "dinov3",
                "orthophoto", "ai")
    HELP = HELP_TEXT

    IS_TREE_FIELD = "IS_TREE_FIELD"
    THRESHOLD = "THRESHOLD"
    CLASS_NAME = "CLASS_NAME"
    DESTINATIONS = (
        Destination("OUTPUT_SIMILARITY", "Class similarity (0..1)", "similarity"),
        Destination("OUTPUT_TREES", "Class mask", "taught_trees"),
    )
    VALUES = (
        Value("TREE_COVER", ("tree_cover",), QgsProcessingOutputNumber, "Class cover (fraction of valid pixels)"),
        Value("THRESHOLD_USED", ("threshold",), QgsProcessingOutputNumber, "Threshold used"),
        *TEACH_VALUES,
    )

    def declare(self) -> list[Declared]:
        return [
            *example_parameters(self.IS_TREE_FIELD, "Class field (1 yes, 0 not)", DEFAULT_IS_TREE_FIELD),
            Declared(QgsProcessingParameterString(
                self.CLASS_NAME, "Class the examples show", defaultValue="tree", optional=True)),
            Declared(QgsProcessingParameterNumber(
                self.THRESHOLD, "Threshold (empty: 0.5, calibrated)", DOUBLE, defaultValue=None, optional=True,
                minValue=0.0, maxValue=1.0)),
            *feature_parameters(),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        given = parameters.get(self.THRESHOLD)
        threshold = None if given is None or given == "" else self.parameterAsDouble(parameters, self.THRESHOLD,
                                                                                    context)
        taught = (self.parameterAsString(parameters, self.CLASS_NAME, context) or "").strip() or "tree"
        record, layer = teach_in_engine(self, parameters, context, feedback, self.IS_TREE_FIELD,
                                        DEFAULT_IS_TREE_FIELD, _is_tree, threshold=threshold, class_name=taught)
        feedback.pushInfo(f"Examples used: {record.examples.trees} {taught}, "
                          f"{record.examples.not_trees} other; {record.threshold_note}; "
                          f"feature cache: {record.feature_cache}.")
        style_loaded_outputs(context, record, OutputGroup.for_teach(record, layer.name()))
        return self.results(record)


CLASSES_HELP = f"""<p>Teaches <b>several classes at once</b> from example points: a point layer whose
text field names each point's class (live tree, dead tree, other…; two or more classes, empty values
skipped). A regularised classifier learns from the DINOv3 features around the points; every pixel gets a
calibrated probability of each class.</p>
<h3>Outputs</h3>
<ul>
<li><b>Classes</b>: a paletted GeoTIFF, 1.. the classes in the order they first appear (category names are
the class names), 0 = unsure (no class reaches 0.5), 255 = nodata.</li>
<li><b>Class probabilities</b>: a GeoTIFF with one band per class, named after it.</li>
<li><b>Class polygons</b>: a GeoPackage of the classes' areas with a <i>class</i> field.</li>
<li>A record (<i>_classes_teach.json</i>) beside the class raster.</li>
</ul>
{WEIGHTS_HELP}"""


class TeachClassesAlgorithm(ClassOutputsAlgorithm):
    """A class raster, class probabilities and class polygons from points of several classes."""

    NAME = "teachclasses"
    DISPLAY_NAME = "Teach several classes by example (DINOv3)"
    GROUP = "Segmentation"
    TAGS = ("classes", "class", "dead trees", "examples", "points", "few-shot", "dinov3", "orthophoto", "ai")
    HELP = CLASSES_HELP

    CLASS_FIELD = "CLASS_FIELD"

    def declare(self) -> list[Declared]:
        return [
            *example_parameters(self.CLASS_FIELD, "Field naming each point's class", CLASS_FIELD),
            *feature_parameters(),
        ]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        record, layer = teach_in_engine(self, parameters, context, feedback, self.CLASS_FIELD, CLASS_FIELD,
                                        _class_name, several_classes=True)
        covers = ", ".join(f"{name} {100 * cover:.1f} %" for name, cover in record.class_cover.items())
        feedback.pushInfo(f"Classes: {covers}; {record.threshold_note}; feature cache: {record.feature_cache}.")
        style_loaded_outputs(context, record, OutputGroup.for_teach(record, layer.name()))
        return self.results(record)


def teach_in_engine(algorithm: EngineAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext,
                    feedback: QgsProcessingFeedback, field_parameter: str, default_field: str,
                    read: Callable[[Any], bool | str | None], *, threshold: float | None = None,
                    class_name: str | None = None, several_classes: bool = False,
                    ) -> tuple[TaughtRecord, QgsRasterLayer]:
    """The teach run both algorithms make: the example points (their kind `read` from the field) as pixel
    positions, the parameters checked, the engine's teach job; its record (warned about untrained weights) and
    the input layer."""
    python, layer = algorithm.engine_and_input(parameters, context)
    source = algorithm.parameterAsSource(parameters, EXAMPLES_PARAMETER, context)
    if source is None:
        raise QgsProcessingException(algorithm.invalidSourceError(parameters, EXAMPLES_PARAMETER))
    field = algorithm.parameterAsString(parameters, field_parameter, context) or default_field
    examples = pixel_examples(layer, source, field, context, feedback, read)
    if several_classes and len({kind for _, _, kind in examples}) < 2:
        raise QgsProcessingException(f"The field '{field}' names fewer than two classes: teaching several "
                                     "classes needs examples of at least two.")
    params = teach_params(algorithm, parameters, context, layer)
    named = {"class_name": class_name} if class_name else {}
    record = run_in_engine(python, feedback, lambda client, watch: client.teach(
        params, examples, threshold, watch, hf_token=hf_token(), **named))
    if record.warning:
        feedback.pushWarning(record.warning)
    return record, layer


def pixel_examples(layer: QgsRasterLayer, source: QgsFeatureSource, field: str, context: QgsProcessingContext,
                   feedback: QgsProcessingFeedback,
                   read: Callable[[Any], bool | str | None] | None = None) -> list[PixelExample]:
    """The example points as (col, row, kind) pixel positions of the raster `layer` (through its file's
    geotransform, as the dock's clicks); the kind is `read` from the field (default: is_tree, True or False;
    None skips the point)."""
    read = read or _is_tree
    grid = RasterGrid.of_file(raster_file(layer))
    if source.fields().lookupField(field) < 0:
        raise QgsProcessingException(f"The example points have no field '{field}': choose the field that says "
                                     "which points show the class (1 = yes, 0 = something else).")
    if not source.sourceCrs().isValid() and layer.crs().isValid():
        raise QgsProcessingException(f"The example points have no CRS, and the raster has one "
                                     f"({layer.crs().authid()}): set the points' CRS (Layer CRS) and run again.")
    transform = QgsCoordinateTransform(source.sourceCrs(), layer.crs(), context.transformContext())
    examples: list[PixelExample] = []
    skipped = 0
    for feature in source.getFeatures():
        is_tree = read(feature[field])
        geometry = feature.geometry()
        if is_tree is None or geometry.isNull():
            skipped += 1
            continue
        for vertex in geometry.vertices():
            try:
                point = transform.transform(vertex.x(), vertex.y())
            except QgsCsException as error:
                raise QgsProcessingException(
                    f"An example point cannot be transformed into the raster's CRS: {error}") from error
            examples.append((*grid.pixel(point), is_tree))
    if skipped:
        feedback.pushWarning(f"{skipped} example points without a geometry or a class / not-class value were "
                             "skipped.")
    return examples


def _class_name(value: Any) -> str | None:
    """A class field's text, trimmed; None when empty."""
    if value is None or (isinstance(value, QVariant) and value.isNull()):
        return None
    return str(value).strip() or None


def _is_tree(value: Any) -> bool | None:
    """1 / true → True, 0 / false → False, empty or anything else → None."""
    if value is None or (isinstance(value, QVariant) and value.isNull()):
        return None
    if isinstance(value, (int, float)):
        return bool(value) if value in (0, 1) else None
    text = str(value).strip().lower()
    if text in TRUE_TEXTS:
        return True
    if text in FALSE_TEXTS:
        return False
    return None
