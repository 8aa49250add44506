"""What the algorithms run by the engine worker share: model parameters, file outputs and one engine job.

Standard library, QGIS and engine_client only: no torch, no engine core.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterString,
    QgsRasterLayer,
    QgsSettings,
)

from ...catalogue import BACKBONES
from ..compat import ADVANCED
from ..engine_client import EngineClient, EngineError, find_engine_python, missing_engine_message, shared_engine

MODEL_NAMES = tuple(BACKBONES)
DEFAULT_MODEL = "base"
STRIDES = ("16", "8", "4")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
ENGINE_PYTHON_SETTING = "treeseg/engine_python"
MODEL_PAGE = "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m"
HELP_URL = "https://github.com/treeseg-qgis/treeseg-qgis#processing-graphical-modeler-and-qgis_process"
NON_FILE_DESTINATION = re.compile(r"^(ogr|memory|postgres|postgis|spatialite|mssql|oracle|hana):", re.IGNORECASE)
RASTER_SUFFIXES = (".tif", ".tiff")
GEOPACKAGE_SUFFIXES = (".gpkg",)

WEIGHTS_HELP = f"""<h3>Model weights</h3>
<p>The DINOv3 weights are <b>gated</b> on Hugging Face. Once: open the model page (for the default
model <a href="{MODEL_PAGE}">{MODEL_PAGE}</a>), log in and accept the licence, then create a read
token at https://huggingface.co/settings/tokens and save it under <b>Raster ▸ TreeSeg (DINOv3) ▸ Models…</b>
(kept in the QGIS authentication database), or set the <b>HF_TOKEN</b> environment variable before
starting QGIS (or run <i>hf auth login</i>). The weights are downloaded once into the Hugging Face
cache; the Models… window downloads and deletes them. A Hugging Face id or a local model folder can
be given under <i>Model id or folder</i> (advanced); it overrides the model chosen above.</p>
<p><b>Allow untrained weights</b> lets the run go on with random weights when the real ones cannot be
had. The result is then only a check of the pipeline, not a segmentation; every output says so.</p>
<p><b>Stride</b>: 16 gives one feature per 16 × 16 patch; 8 costs 4 × the time, 4 costs 16 ×.
<b>Device</b> (advanced): <i>auto</i> takes a GPU when the engine finds one, else the CPU.</p>
<p>The model runs in a separate engine process (its own Python with torch); QGIS stays responsive
and Cancel stops it within about a second.</p>"""


def help_html(text: str) -> str:
    """Help text as the dialog should show it: the line breaks of the source joined, so paragraphs wrap to
    the panel instead of breaking mid-sentence."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


class EngineAlgorithm(QgsProcessingAlgorithm):
    """Base of the algorithms whose work the engine worker process does."""

    MODEL = "MODEL"
    MODEL_ID = "MODEL_ID"
    STRIDE = "STRIDE"
    DEVICE = "DEVICE"
    PRECISION = "PRECISION"
    ALLOW_UNTRAINED = "ALLOW_UNTRAINED"

    def helpUrl(self) -> str:
        return HELP_URL

    def add_advanced(self, parameter: QgsProcessingParameterDefinition) -> None:
        parameter.setFlags(parameter.flags() | ADVANCED)
        self.addParameter(parameter)

    def add_model_parameters(self) -> None:
        """MODEL, the advanced MODEL_ID that overrides it, and STRIDE."""
        self.addParameter(QgsProcessingParameterEnum(
            self.MODEL, "DINOv3 model", options=list(MODEL_NAMES), defaultValue=DEFAULT_MODEL,
            usesStaticStrings=True))
        self.add_advanced(QgsProcessingParameterString(
            self.MODEL_ID, "Model id or folder (overrides Model)", optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.STRIDE, "Stride (px)", options=list(STRIDES), defaultValue=STRIDES[0], usesStaticStrings=True))

    def add_device_parameters(self) -> None:
        """The advanced DEVICE and PRECISION, and ALLOW_UNTRAINED."""
        self.add_advanced(QgsProcessingParameterEnum(
            self.DEVICE, "Device", options=list(DEVICES), defaultValue=DEVICES[0], usesStaticStrings=True))
        self.add_advanced(QgsProcessingParameterEnum(
            self.PRECISION, "Precision",
            options=list(PRECISIONS), defaultValue=PRECISIONS[0], usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterBoolean(
            self.ALLOW_UNTRAINED, "Allow untrained weights", defaultValue=False))

    def input_raster(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> QgsRasterLayer:
        """The raster layer of parameter `name`, or the standard invalid-raster error."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        return layer

    def model_params(self, parameters: dict[str, Any], context: QgsProcessingContext) -> dict[str, Any]:
        """The SegmentationParams entries of the model, stride and device parameters."""
        return {
            "model": self.parameterAsString(parameters, self.MODEL_ID, context).strip()
            or self.parameterAsEnumString(parameters, self.MODEL, context),
            "stride": int(self.parameterAsEnumString(parameters, self.STRIDE, context)),
            "device": self.parameterAsEnumString(parameters, self.DEVICE, context),
            "precision": self.parameterAsEnumString(parameters, self.PRECISION, context),
            "allow_untrained": self.parameterAsBoolean(parameters, self.ALLOW_UNTRAINED, context),
        }

    def file_destination(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                         suffixes: tuple[str, ...]) -> str:
        """The destination's file path, with the extension of the format the engine writes."""
        path = self.optional_file_destination(parameters, name, context, suffixes)
        if path is None:
            raise QgsProcessingException(f"{self.parameterDefinition(name).description()}: choose where to save it.")
        return path

    def optional_file_destination(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                                  suffixes: tuple[str, ...]) -> str | None:
        """As file_destination, or None when the optional output was not asked for.

        The parameter is read once: for a temporary output each read makes a new path and queues it for
        loading, and a queued path the engine never writes ends the run with a false "not correctly
        generated" error."""
        requested = self.parameterAsOutputLayer(parameters, name, context)
        if not requested:
            return None
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


def engine_python() -> str:
    """The engine's Python, or a QgsProcessingException that says how to set it up."""
    python = find_engine_python(QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str) or None)
    if python is None:
        raise QgsProcessingException(missing_engine_message())
    return python


class FeedbackReporter:
    """Engine progress and log messages into a Processing feedback."""

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


def run_in_engine(python: str, feedback: QgsProcessingFeedback,
                  job: Callable[[EngineClient, FeedbackReporter], dict[str, Any]]) -> dict[str, Any]:
    """Run `job` on the session's shared worker of the engine `python` (its model stays loaded for the next
    run; the job waits its turn behind the panel's or another run's, cancellable), reporting to `feedback`;
    its record or a QgsProcessingException."""
    try:
        return job(shared_engine(python), FeedbackReporter(feedback))
    except EngineError as error:
        raise QgsProcessingException(str(error)) from error
