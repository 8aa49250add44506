"""Background tasks that drive the engine worker process: one segmentation run, and the device probe.

`run()` executes on a worker thread and only talks to the EngineClient; every
layer, project and message-bar change happens in `finished()` on the main thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsMessageLog, QgsProject, QgsRasterLayer, QgsTask
from qgis.gui import QgsMessageBar
from qgis.PyQt.QtCore import pyqtSignal

from ..engine_client import EngineClient, EngineError
from ..qgis_results import LOG_TAG, add_result_layers, model_label

MESSAGE_TITLE = "TreeSeg"
UNTRAINED_SUMMARY = "UNTRAINED weights, pipeline check only."
LOG_LEVELS = {"warning": Qgis.MessageLevel.Warning, "error": Qgis.MessageLevel.Critical,
              "critical": Qgis.MessageLevel.Critical}


class SegmentationTask(QgsTask):
    """One segmentation run of `params` (SegmentationParams fields as a plain dict) in the engine.

    On success the outputs are added to the project as a styled group and a summary goes to the
    message bar; on failure the message bar explains; a cancelled run leaves nothing behind.
    `stage_changed` carries the engine's stage text, `done(success, summary)` follows `finished()`.
    """

    stage_changed = pyqtSignal(str)
    done = pyqtSignal(bool, str)

    def __init__(self, engine: EngineClient, params: dict[str, Any], layer: QgsRasterLayer,
                 message_bar: QgsMessageBar, scratch_folder: Path | None = None) -> None:
        super().__init__(f"TreeSeg: segmenting {layer.name()}", QgsTask.Flag.CanCancel)
        self.engine = engine
        self.params = params
        self.input_name = layer.name()
        self.message_bar = message_bar
        self.scratch_folder = scratch_folder
        self.record: dict[str, Any] | None = None
        self.error: EngineError | None = None
        self._stage = ""
        self.setDependentLayers([layer])

    def run(self) -> bool:
        """Worker thread: run the job; never raises, keeps the error for `finished()`."""
        try:
            self.record = self.engine.segment(self.params, on_progress=self._on_progress, on_log=_log,
                                              is_cancelled=self.isCanceled)
        except EngineError as error:
            self.error = error
        except Exception as error:  # noqa: BLE001 - a task must not raise; the message bar reports it
            self.error = EngineError("internal", f"{type(error).__name__}: {error}")
        return self.record is not None

    def _on_progress(self, percent: float, stage: str) -> None:
        self.setProgress(percent)
        if stage != self._stage:
            self._stage = stage
            self.stage_changed.emit(stage)

    def finished(self, result: bool) -> None:
        """Main thread: add the layers and report, or explain the failure."""
        if self.scratch_folder is not None:
            shutil.rmtree(self.scratch_folder, ignore_errors=True)
        if result and self.record is not None:
            success, summary = self._add_results(self.record)
        elif self.isCanceled() or (self.error is not None and self.error.kind == "cancelled"):
            success, summary = False, "Cancelled."
            self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: cancelled.",
                                         Qgis.MessageLevel.Info, 5)
        else:
            summary = str(self.error) if self.error is not None else "The run stopped without a result."
            success = False
            self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: {summary}",
                                         Qgis.MessageLevel.Critical, 0)
        self.done.emit(success, summary)

    def _add_results(self, record: dict[str, Any]) -> tuple[bool, str]:
        try:
            add_result_layers(record, self.input_name, QgsProject.instance())
        except Exception as error:  # noqa: BLE001 - the files exist; say why they could not be shown
            summary = f"The run finished but its layers could not be added: {error}"
            self.message_bar.pushMessage(MESSAGE_TITLE, summary, Qgis.MessageLevel.Critical, 0)
            return False, summary
        summary = run_summary(record)
        level, duration = ((Qgis.MessageLevel.Warning, 0) if record["model"]["untrained"]
                           else (Qgis.MessageLevel.Success, 10))
        self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: {summary}", level, duration)
        return True, summary


def run_summary(record: dict[str, Any]) -> str:
    """One line: K, tree cover, model, device and time; untrained weights said first."""
    summary = (f"K={record['clusters']['k']}, tree cover {100 * float(record['trees']['tree_cover']):.1f} %, "
               f"{model_label(record)} on {record['model']['device']}, {float(record['timings']['total']):.0f} s.")
    return f"{UNTRAINED_SUMMARY} {summary}" if record["model"]["untrained"] else summary


class ProbeTask(QgsTask):
    """Asks the engine which device it would use; `probed(description, ok)` reports it on the main thread."""

    probed = pyqtSignal(str, bool)

    def __init__(self, engine: EngineClient) -> None:
        super().__init__("TreeSeg: starting the engine", QgsTask.Flag.CanCancel | QgsTask.Flag.CancelWithoutPrompt)
        self.engine = engine
        self.info: dict[str, Any] | None = None
        self.error = ""

    def run(self) -> bool:
        try:
            self.info = self.engine.probe()
        except Exception as error:  # noqa: BLE001 - a task must not raise; the dock shows the reason
            self.error = str(error)
        return self.info is not None

    def finished(self, result: bool) -> None:
        if result and self.info is not None:
            self.probed.emit(f"{self.info['device_description']} · torch {self.info['torch']}", True)
        else:
            self.probed.emit(self.error or "The engine did not answer.", False)


def _log(level: str, message: str) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, LOG_LEVELS.get(level, Qgis.MessageLevel.Info))
