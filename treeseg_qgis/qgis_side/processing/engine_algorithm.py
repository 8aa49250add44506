"""What the Processing algorithms share: their description, declared parameters read into one object, file
outputs, and one job in the engine worker.

`DescribedAlgorithm` holds an algorithm's identity, help and returned values as class attributes (the torch-free
evaluation derives from it directly). `EngineAlgorithm`, the base of those the engine worker runs: an algorithm
declares its parameters once (`declare()`: the QGIS definition, the field of `SegmentationParams` (or
`CrownOptions`) it fills and how its value converts with a reader such as `read_clusters`, like QGIS's
GdalAlgorithm subclasses that only describe their command; `model_parameters()` and its siblings are the shared
groups); the base adds them, reads them into one `SegmentationParams` and validates it before the engine starts.
Its outputs are tables too: `DESTINATIONS`, the files the engine writes (the destination parameters, read into
output files by kind), and `VALUES`, what it returns from the run's record; the base declares both and builds the
results from the record. `engine_python()` finds the engine (engine_client owns the setting),
`run_in_engine` runs one job on the shared EngineClient with the feedback's progress and cancel.
Standard library, QGIS, the shared top-level modules (params, outputs, catalogue, run_record) and engine_client only: no
torch, no engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingDestinationParameter,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputDefinition,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, QThread

from ... import params
from ...catalogue import DEFAULT_MODEL
from ...outputs import SEGMENT_KINDS, SUFFIXES, OutputPathError, check_run_paths
from ...params import ParameterError, SegmentationParams, parse_cluster_ids, parse_clusters
from ..compat import ADVANCED, INTEGER, POLYGON_LAYERS
from ..engine_client import (
    EngineClient,
    EngineError,
    JobWatch,
    configured_engine_python,
    missing_engine_message,
    shared_engine,
)
from ..raster_input import absolute_file
from ..results import orthophoto_for

MODEL_PAGE = "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m"
HELP_URL = "https://github.com/treeseg-qgis/treeseg-qgis#processing-graphical-modeler-and-qgis_process"
NON_FILE_DESTINATION = re.compile(r"^(ogr|memory|postgres|postgis|spatialite|mssql|oracle|hana):", re.IGNORECASE)
RASTER_SUFFIXES = (".tif", ".tiff")
RecordT = TypeVar("RecordT")
GEOPACKAGE_SUFFIXES = (".gpkg",)

WEIGHTS_HELP = f"""<h3>Model weights</h3>
<p>The DINOv3 weights are <b>gated</b> on Hugging Face. Once: open the model page (for the default
model <a href="{MODEL_PAGE}">{MODEL_PAGE}</a>), log in and accept the licence, then create a read
token at https://huggingface.co/settings/tokens and save it under <b>Raster ▸ TreeSeg (DINOv3) ▸ Models…</b>
(kept in the QGIS authentication database), or set the <b>HF_TOKEN</b> environment variable before
starting QGIS (or run <i>hf auth login</i>). The weights are downloaded once into the Hugging Face
cache; the Models… window downloads and deletes them. A Hugging Face id or a local model folder can
be given under <i>Model id or folder</i> (advanced); it overrides the model chosen above.</p>
<p><b>Untrained OK</b> lets the run go on with untrained (random) weights when the real ones cannot be
had. The result is then only a check of the pipeline, not a segmentation; every output says so.</p>
<p><b>Stride</b>: 16 gives one feature per 16 × 16 patch; 8 costs 4 × the time, 4 costs 16 ×.
<b>Device</b> (advanced): <i>auto</i> takes a GPU when the engine finds one, else the CPU.</p>
<p>The model runs in a separate engine process (its own Python with torch); QGIS stays responsive
and Cancel stops it within about a second.</p>"""


def help_html(text: str) -> str:
    """Help text as the dialog should show it: the line breaks of the source joined, so paragraphs wrap to
    the panel instead of breaking mid-sentence."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


Reader = Callable[[QgsProcessingAlgorithm, dict[str, Any], str, QgsProcessingContext], Any]
"""How a declared parameter's value becomes a field value; None leaves the field at its default. A value used
as it is comes from QgsProcessingAlgorithm's own accessor (called with the algorithm first)."""
read_choice: Reader = QgsProcessingAlgorithm.parameterAsEnumString
"""An enum with static strings: the chosen string."""
read_int: Reader = QgsProcessingAlgorithm.parameterAsInt
read_number: Reader = QgsProcessingAlgorithm.parameterAsDouble
read_bool: Reader = QgsProcessingAlgorithm.parameterAsBoolean


def read_text(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
              context: QgsProcessingContext) -> str | None:
    """Stripped text; empty text leaves the field at its default."""
    return algorithm.parameterAsString(parameters, name, context).strip() or None


def read_model(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
               context: QgsProcessingContext) -> str | None:
    """A Hugging Face id or a model folder; a folder relative to the caller's working folder made absolute."""
    text = read_text(algorithm, parameters, name, context)
    return absolute_file(text) if text is not None and os.path.isdir(text) else text


def read_file(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
              context: QgsProcessingContext) -> str | None:
    """A file path, made absolute against the caller's working folder; none given leaves the field at its
    default."""
    return absolute_file(algorithm.parameterAsFile(parameters, name, context).strip()) or None


def read_stride(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
                context: QgsProcessingContext) -> int | None:
    """A stride; none chosen (an optional stride left empty) leaves the field at its default."""
    text = algorithm.parameterAsEnumString(parameters, name, context)
    return int(text) if text else None


def read_number_zero_off(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
                         context: QgsProcessingContext) -> float | None:
    """A number where 0 means off (None)."""
    return algorithm.parameterAsDouble(parameters, name, context) or None


def read_clusters(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
                  context: QgsProcessingContext) -> int | str:
    """A number of clusters where 0 means automatic (params.AUTO)."""
    return parse_clusters(algorithm.parameterAsInt(parameters, name, context))


def read_bands(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
               context: QgsProcessingContext) -> tuple[int, ...] | None:
    """Band numbers; none chosen leaves the default bands."""
    return tuple(algorithm.parameterAsInts(parameters, name, context)) or None


def read_cluster_ids(algorithm: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
                     context: QgsProcessingContext) -> tuple[int, ...] | None:
    return parse_cluster_ids(algorithm.parameterAsString(parameters, name, context))


@dataclass(frozen=True)
class Declared:
    """One parameter of an algorithm: its QGIS definition, the field it fills (None: the algorithm reads it
    itself), how its value converts, and its help (the tooltip; the description stays short: the batch dialog
    heads its column with it)."""

    definition: QgsProcessingParameterDefinition
    field: str | None = None
    read: Reader | None = None
    advanced: bool = False
    help: str = ""


@dataclass(frozen=True)
class Destination:
    """A file the engine writes, declared as a destination parameter: a GeoTIFF or a polygon GeoPackage after
    its kind's suffix (outputs.SUFFIXES); an optional one is advanced and not created unless asked for."""

    name: str
    description: str
    kind: str
    optional: bool = False

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The file extensions the engine writes it with, the first the one it gets."""
        return RASTER_SUFFIXES if Path(SUFFIXES[self.kind]).suffix in RASTER_SUFFIXES else GEOPACKAGE_SUFFIXES

    def parameter(self) -> QgsProcessingDestinationParameter:
        """Its QGIS destination parameter."""
        options = {"optional": self.optional, "createByDefault": not self.optional}
        if self.suffixes == RASTER_SUFFIXES:
            parameter = QgsProcessingParameterRasterDestination(self.name, self.description, **options)
        else:
            parameter = QgsProcessingParameterVectorDestination(self.name, self.description, POLYGON_LAYERS,
                                                                **options)
        if self.optional:
            parameter.setFlags(parameter.flags() | ADVANCED)
        return parameter


@dataclass(frozen=True)
class Value:
    """A value an algorithm returns: its output name, the names that lead to it in the job's record (its fields
    (run_record.py), then the keys of a table such as its outputs by kind), and the QgsProcessingOutput class and
    description that declare it (None: a parameter of declare() does)."""

    name: str
    keys: tuple[str, ...]
    output: type[QgsProcessingOutputDefinition] | None = None
    description: str = ""

    def found_in(self, record: Any) -> Any:
        """Its value in `record` (a typed record, or a dict: the evaluation's); None where the record lacks it."""
        value: Any = record
        for key in self.keys:
            if value is None:
                return None
            value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        return value


CROWN_COUNT = Value("CROWNS", ("crowns",), QgsProcessingOutputNumber, "Number of tree crowns")


def orthophoto_parameter() -> Declared:
    """INPUT, the orthophoto the model reads; a dialog offers the one the run panel would (not a result raster,
    which QGIS's combo box takes when it is selected in Layers or comes first by name)."""
    definition = QgsProcessingParameterRasterLayer(EngineAlgorithm.INPUT, "Orthophoto")
    if (layer := dialog_orthophoto()) is not None:
        definition.setGuiDefaultValueOverride(layer.id())
    return Declared(definition,
                    help="A raster file (GeoTIFF, VRT…): export a web layer (WMS, XYZ) to a GeoTIFF first.")


def dialog_orthophoto() -> QgsRasterLayer | None:
    """On the main thread (where dialogs create algorithms; the project is not read from another thread): the
    project's orthophoto for the layer selected in Layers (results.orthophoto_for); None without one."""
    application = QCoreApplication.instance()
    if application is None or QThread.currentThread() is not application.thread():
        return None
    from qgis.utils import iface

    return orthophoto_for(iface.activeLayer() if iface is not None else None, QgsProject.instance())


def model_parameters() -> list[Declared]:
    """MODEL, the advanced MODEL_ID that overrides it, and STRIDE."""
    return [
        Declared(QgsProcessingParameterEnum("MODEL", "DINOv3 model", options=list(params.MODEL_NAMES),
                                            defaultValue=DEFAULT_MODEL, usesStaticStrings=True), "model", read_choice,
                 help="A Model id or folder (advanced) overrides it."),
        Declared(QgsProcessingParameterString("MODEL_ID", "Model id or folder", optional=True),
                 "model", read_model, advanced=True,
                 help="A Hugging Face id or a local folder of a DINOv3 model; overrides the DINOv3 model."),
        Declared(QgsProcessingParameterEnum("STRIDE", "Stride (px)", options=[str(s) for s in params.STRIDES],
                                            defaultValue=str(params.STRIDES[0]), usesStaticStrings=True), "stride",
                 read_stride),
    ]


def device_parameters() -> list[Declared]:
    """The advanced DEVICE and PRECISION, and ALLOW_UNTRAINED."""
    return [
        Declared(QgsProcessingParameterEnum("DEVICE", "Device", options=list(params.DEVICES),
                                            defaultValue=params.DEVICES[0],
                                            usesStaticStrings=True), "device", read_choice, advanced=True),
        Declared(QgsProcessingParameterEnum("PRECISION", "Precision", options=list(params.PRECISIONS),
                                            defaultValue=params.PRECISIONS[0], usesStaticStrings=True), "precision",
                 read_choice, advanced=True),
        Declared(QgsProcessingParameterBoolean("ALLOW_UNTRAINED", "Untrained OK", defaultValue=False),
                 "allow_untrained", read_bool, help="Go on with random weights when the real ones cannot be had: "
                 "a check of the pipeline, not a segmentation; every output says so."),
    ]


def feature_parameters() -> list[Declared]:
    """What computing the model's features runs with (a teach, a taught classifier applied): the model's
    parameters and the device's."""
    return [*model_parameters(), *device_parameters()]


def clustering_parameters() -> list[Declared]:
    """What a clustering of the model's features runs with: the model's parameters, CLUSTERS (0: automatic)
    and the device's parameters."""
    clusters = Declared(QgsProcessingParameterNumber(
        "CLUSTERS", "K (0: auto)", INTEGER, defaultValue=0, minValue=0, maxValue=params.K_MAX),
        "clusters", read_clusters, help="The number of clusters K; 0 picks K automatically (the elbow of the "
        "k-means inertia).")
    return [*model_parameters(), clusters, *device_parameters()]


class DescribedAlgorithm(QgsProcessingAlgorithm):
    """An algorithm whose identity, help and returned values are class attributes; a new instance is one of its
    own class."""

    NAME = ""
    DISPLAY_NAME = ""
    GROUP = ""
    TAGS: tuple[str, ...] = ()
    HELP = ""
    VALUES: tuple[Value, ...] = ()

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:
        return self.DISPLAY_NAME

    def group(self) -> str:
        return self.GROUP

    def groupId(self) -> str:
        return self.GROUP.lower()

    def tags(self) -> list[str]:
        return list(self.TAGS)

    def shortHelpString(self) -> str:
        return help_html(self.HELP)

    def helpUrl(self) -> str:
        return HELP_URL

    def createInstance(self) -> DescribedAlgorithm:
        return type(self)()

    def add_values(self) -> None:
        """Declare the outputs of VALUES that no parameter declares."""
        for value in self.VALUES:
            if value.output is not None:
                self.addOutput(value.output(value.name, value.description))

    def returned(self) -> tuple[Value, ...]:
        """What the algorithm returns: VALUES."""
        return self.VALUES

    def results(self, record: Any) -> dict[str, Any]:
        """Output name → value of each returned value that `record` holds."""
        found = {value.name: value.found_in(record) for value in self.returned()}
        return {name: value for name, value in found.items() if value is not None}


class EngineAlgorithm(DescribedAlgorithm):
    """Base of the algorithms whose work the engine worker process does: it adds the declared parameters and
    the destinations after them, reads the parameters into their fields and validates the run's parameters
    before the engine starts."""

    INPUT = "INPUT"
    DESTINATIONS: tuple[Destination, ...] = ()

    def declare(self) -> list[Declared]:
        """The algorithm's parameters, in dialog order (new definitions on each call)."""
        raise NotImplementedError

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:
        self._readers: list[tuple[str, str, Reader]] = []
        for item in self.declare():
            if item.advanced:
                item.definition.setFlags(item.definition.flags() | ADVANCED)
            if item.help:
                item.definition.setHelp(item.help)
            self.addParameter(item.definition)
            if item.field is not None and item.read is not None:
                self._readers.append((item.definition.name(), item.field, item.read))
        for destination in self.DESTINATIONS:
            self.addParameter(destination.parameter())
        self.add_values()

    def output_files(self, parameters: dict[str, Any], context: QgsProcessingContext) -> dict[str, str | None]:
        """Output kind → file of each of DESTINATIONS (None: an optional one not asked for)."""
        files: dict[str, str | None] = {}
        for destination in self.DESTINATIONS:
            read = self.optional_file_destination if destination.optional else self.file_destination
            files[destination.kind] = read(parameters, destination.name, context, destination.suffixes)
        return files

    def returned(self) -> tuple[Value, ...]:
        """The files of DESTINATIONS (under the record's outputs), then VALUES."""
        return (*(Value(destination.name, ("outputs", destination.kind)) for destination in self.DESTINATIONS),
                *self.VALUES)

    def declared_values(self, parameters: dict[str, Any], context: QgsProcessingContext) -> dict[str, Any]:
        """Field → value of every declared parameter that fills a field (a later one wins unless None)."""
        values: dict[str, Any] = {}
        for name, field, read in self._readers:
            try:
                value = read(self, parameters, name, context)
            except ParameterError as error:
                raise QgsProcessingException(str(error)) from None
            if value is not None:
                values[field] = value
        return values

    def read_params(self, parameters: dict[str, Any], context: QgsProcessingContext,
                    **values: Any) -> SegmentationParams:
        """The run's SegmentationParams: the declared parameters' fields, and `values` (what the algorithm
        works out itself: input, output folder and files)."""
        return SegmentationParams(**{**self.declared_values(parameters, context), **values})

    @staticmethod
    def check_params(run: SegmentationParams, kinds: tuple[str, ...] = SEGMENT_KINDS,
                     inputs: tuple[str, ...] = ()) -> None:
        """Validate the run and check its output paths (`inputs`: files read besides the input): a
        QgsProcessingException with the reason, before any engine starts."""
        try:
            run.validate()
            check_run_paths(run, kinds, inputs)
        except (ParameterError, OutputPathError) as error:
            raise QgsProcessingException(str(error)) from None

    def engine_and_input(self, parameters: dict[str, Any], context: QgsProcessingContext) -> tuple[str, QgsRasterLayer]:
        """The engine's Python, found first (without an engine nothing is read), and the INPUT raster layer."""
        python = engine_python()
        return python, self.input_raster(parameters, self.INPUT, context)

    def input_raster(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> QgsRasterLayer:
        """The raster layer of parameter `name`, or the standard invalid-raster error."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        return layer

    def file_destination(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                         suffixes: tuple[str, ...]) -> str:
        """The destination's file path, with the extension of the format the engine writes."""
        path = self.optional_file_destination(parameters, name, context, suffixes)
        if path is None:
            raise QgsProcessingException(f"{self.parameterDefinition(name).description()}: choose where to save it.")
        return path

    def optional_file_destination(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                                  suffixes: tuple[str, ...]) -> str | None:
        """As file_destination, or None when the optional output was not asked for. A relative path is made
        absolute against the caller's working folder (qgis_process's), never left to the engine worker's.

        The parameter is read once: for a temporary output each read makes a new path and queues it for
        loading, and a queued path the engine never writes ends the run with a false "not correctly
        generated" error. An optional output left blank (the batch dialog's empty definition) is taken out of
        the load queue for the same reason."""
        requested = self.parameterAsOutputLayer(parameters, name, context)
        if not requested:
            _load_on_completion_as(context, requested, None)
            return None
        if NON_FILE_DESTINATION.match(requested):
            raise QgsProcessingException(
                f"{self.parameterDefinition(name).description()}: save to a {suffixes[0]} file, "
                "not into a database or a temporary layer.")
        actual = absolute_file(requested)
        if Path(actual).suffix.lower() not in suffixes:
            actual = str(Path(actual).with_suffix(suffixes[0]))
        if actual != requested:
            _load_on_completion_as(context, requested, actual)
        return actual


def _load_on_completion_as(context: QgsProcessingContext, queued: str, path: str | None) -> None:
    """The layer queued for loading as `queued` loads from `path` instead (None: not at all)."""
    if not context.willLoadLayerOnCompletion(queued):
        return
    layers = context.layersToLoadOnCompletion()
    details = layers.pop(queued)
    if path is not None:
        layers[path] = details
    context.setLayersToLoadOnCompletion(layers)


def engine_python() -> str:
    """The engine's Python, or a QgsProcessingException that says how to set it up."""
    python = configured_engine_python()
    if python is None:
        raise QgsProcessingException(missing_engine_message())
    return python


class FeedbackReporter:
    """Engine progress and log messages into a Processing feedback, and its cancel button; `watch` follows a job."""

    def __init__(self, feedback: QgsProcessingFeedback) -> None:
        self.feedback = feedback
        self._last_stage = ""

    def progress(self, percent: float, stage: str) -> None:
        self.feedback.setProgress(percent)
        if stage != self._last_stage:
            self._last_stage = stage
            self.feedback.setProgressText(stage)

    def log(self, level: str, message: str) -> None:
        if level in ("warning", "error", "critical"):
            self.feedback.pushWarning(message)
        else:
            self.feedback.pushInfo(message)

    @property
    def watch(self) -> JobWatch:
        return JobWatch(self.progress, self.log, self.feedback.isCanceled)


def run_in_engine(python: str, feedback: QgsProcessingFeedback,
                  job: Callable[[EngineClient, JobWatch], RecordT]) -> RecordT:
    """Run `job` on the session's shared worker of the engine `python` (its model stays loaded for the next
    run; the job waits its turn behind the panel's or another run's, cancellable), its progress and the engine's
    log lines reported to `feedback`; its record or a QgsProcessingException."""
    try:
        return job(shared_engine(python), FeedbackReporter(feedback).watch)
    except EngineError as error:
        raise QgsProcessingException(str(error)) from error
