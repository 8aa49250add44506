"""Background tasks that drive the engine worker process: a segmentation run, a teach run, one engine call (the
device probe, the model manager's commands).

`run()` executes on a worker thread and only talks to the EngineClient; every
layer, project and message-bar change happens in `finished()` on the main thread.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsMapLayer, QgsMessageLog, QgsProject, QgsRasterLayer, QgsTask
from qgis.gui import QgsMessageBar
from qgis.PyQt.QtCore import pyqtSignal

from ...outputs import remove_files
from ...params import SegmentationParams
from ...run_record import ClassesRecord, RunRecord, TaughtRecord
from ..engine_client import EngineClient, EngineError, JobWatch
from ..results import LOG_TAG, add_result_layers, add_teach_layers, model_label

MESSAGE_TITLE = "TreeSeg"
UNTRAINED_SUMMARY = "UNTRAINED weights, pipeline check only."
FROM_CACHE = "features from cache — model not run"
LOG_LEVELS = {"warning": Qgis.MessageLevel.Warning, "error": Qgis.MessageLevel.Critical,
              "critical": Qgis.MessageLevel.Critical}


class _EngineJobTask(QgsTask):
    """A cancellable task that runs one engine job of `params` on `layer`: `record` on success, else `error`."""

    done = pyqtSignal(bool, str)

    def __init__(self, description: str, engine: EngineClient, params: SegmentationParams, layer: QgsRasterLayer,
                 hf_token: str | None) -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.engine = engine
        self.params = params
        self.input_name = layer.name()
        self.hf_token = hf_token
        self.record: Any = None
        """The job's record (RunRecord, TaughtRecord) once it succeeded."""
        self.error: EngineError | None = None
        self.setDependentLayers([layer])

    def run(self) -> bool:
        """Worker thread: run the job; never raises, keeps the error for `finished()`."""
        try:
            self.record = self._run_job()
        except EngineError as error:
            self.error = error
        except Exception as error:  # noqa: BLE001 - a task must not raise; finished() reports it
            self.error = EngineError("internal", f"{type(error).__name__}: {error}")
        return self.record is not None

    def _run_job(self) -> Any:
        """The engine call (on the worker thread); its record."""
        raise NotImplementedError

    def _was_cancelled(self) -> bool:
        return self.isCanceled() or (self.error is not None and self.error.kind == "cancelled")


class SegmentationTask(_EngineJobTask):
    """One segmentation run of `params` in the engine (validated by the EngineClient before it is sent).

    On success the outputs are added to the project as a styled group and a summary goes to the
    message bar; on failure the message bar explains; a cancelled run leaves nothing behind.
    `stage_changed` carries the engine's stage text, `done(success, summary)` follows `finished()`.
    The scratch folder (the run's input VRT) is removed unless the run succeeded: then the caller
    owns it, since teaching on the same input reuses the run's cached features.
    """

    stage_changed = pyqtSignal(str)

    def __init__(self, engine: EngineClient, params: SegmentationParams, layer: QgsRasterLayer,
                 message_bar: QgsMessageBar, scratch_folder: Path | None = None, hf_token: str | None = None) -> None:
        super().__init__(f"TreeSeg: segmenting {layer.name()}", engine, params, layer, hf_token)
        self.layer_id = layer.id()
        self.message_bar = message_bar
        self.scratch_folder = scratch_folder
        self._stage = ""

    def _run_job(self) -> RunRecord:
        return self.engine.segment(self.params, JobWatch(self._on_progress, _log, self.isCanceled), self.hf_token)

    def _on_progress(self, percent: float, stage: str) -> None:
        self.setProgress(percent)
        if stage != self._stage:
            self._stage = stage
            self.stage_changed.emit(stage)

    def finished(self, result: bool) -> None:
        """Main thread: add the layers and report, or explain the failure."""
        if result and self.record is not None:
            success, summary = self._add_results(self.record)
        elif self._was_cancelled():
            success, summary = False, "Cancelled."
            self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: cancelled.",
                                         Qgis.MessageLevel.Info, 5)
        else:
            summary = str(self.error) if self.error is not None else "The run stopped without a result."
            success = False
            self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: {summary}",
                                         Qgis.MessageLevel.Critical, 0)
        if not success and self.scratch_folder is not None:
            shutil.rmtree(self.scratch_folder, ignore_errors=True)
        self.done.emit(success, summary)

    def _add_results(self, record: RunRecord) -> tuple[bool, str]:
        try:
            add_result_layers(record, self.input_name, QgsProject.instance())
        except Exception as error:  # noqa: BLE001 - the files exist; say why they could not be shown
            summary = f"The run finished but its layers could not be added: {error}"
            self.message_bar.pushMessage(MESSAGE_TITLE, summary, Qgis.MessageLevel.Critical, 0)
            return False, summary
        summary = run_summary(record)
        level = Qgis.MessageLevel.Warning if record.model.untrained else Qgis.MessageLevel.Success
        self.message_bar.pushMessage(MESSAGE_TITLE, f"{self.input_name}: {summary}", level, 0)
        return True, summary


def run_summary(record: RunRecord) -> str:
    """One line: K, tree cover, model, device, time and whether the features came from the cache;
    untrained weights said first."""
    summary = (f"K={record.clusters.k}, tree cover {100 * record.trees.tree_cover:.1f} %, "
               f"{model_label(record)} on {record.model.device}, {record.total_seconds:.0f} s")
    summary += f", {FROM_CACHE}." if record.feature_cache.state == "hit" else "."
    return f"{UNTRAINED_SUMMARY} {summary}" if record.model.untrained else summary


class TeachTask(_EngineJobTask):
    """One click-to-teach run: scores from example pixels (col, row, is_tree; or col, row, class when several
    classes are taught) of `params`' input.

    On success the similarity and the taught tree mask replace the layers listed in `replacing` (and
    the files of the teach run in `replaced_outputs` are deleted); `layers` then holds the new ones.
    `done(success, summary)` follows `finished()`.
    """

    def __init__(self, engine: EngineClient, params: SegmentationParams,
                 examples: list[tuple[float, float, bool | str]],
                 threshold: float | None, layer: QgsRasterLayer, replacing: list[str],
                 replaced_outputs: list[str], hf_token: str | None = None, class_name: str = "tree") -> None:
        super().__init__(f"TreeSeg: teaching on {layer.name()}", engine, params, layer, hf_token)
        self.examples = examples
        self.threshold = threshold
        self.class_name = class_name
        self.replacing = replacing
        self.replaced_outputs = replaced_outputs
        self.layers: list[QgsMapLayer] = []

    def _run_job(self) -> TaughtRecord:
        return self.engine.teach(self.params, self.examples, self.threshold,
                                 JobWatch(lambda percent, _: self.setProgress(percent), _log, self.isCanceled),
                                 hf_token=self.hf_token, class_name=self.class_name)

    def finished(self, result: bool) -> None:
        """Main thread: swap in the new layers, or explain the failure."""
        if not result or self.record is None:
            self.done.emit(False, "Cancelled." if self._was_cancelled() else str(self.error or "Teaching stopped."))
            return
        try:
            self.layers = add_teach_layers(self.record, self.input_name, QgsProject.instance(), self.replacing)
        except Exception as error:  # noqa: BLE001 - the files exist; say why they could not be shown
            self.done.emit(False, f"Teaching finished but its layers could not be added: {error}")
            return
        _remove_outputs(self.replaced_outputs)
        self.done.emit(True, teach_summary(self.record))


def teach_summary(record: TaughtRecord) -> str:
    """One line: examples, threshold (and where it came from), cover and whether the model ran; untrained
    weights said first."""
    features = FROM_CACHE if record.feature_cache == "hit" else "features computed by the model"
    if isinstance(record, ClassesRecord):
        covers = ", ".join(f"{name} {100 * cover:.1f} %" for name, cover in record.class_cover.items())
        examples = ", ".join(f"{count} {name}" for name, count in record.examples.items())
        summary = f"{examples} examples; {record.threshold_note}: {covers}, {features}."
    else:
        taught = record.class_name or "tree"
        note = record.threshold_note or f"score ≥ {record.threshold:.2f}"
        summary = (f"{record.examples.trees} {taught} and {record.examples.not_trees} other examples; {note}: "
                   f"{taught} cover {100 * record.tree_cover:.1f} %, {features}.")
    return f"{UNTRAINED_SUMMARY} {summary}" if record.model.untrained else summary


class EngineCallTask(QgsTask):
    """One engine call off the UI thread: `record`, its answer, or `error` in words; `completed(record, error)`
    follows on the main thread.

    `call(task)` gets the task, for `report(percent, stage)` and `isCanceled`.
    """

    completed = pyqtSignal(object, str)
    stage_changed = pyqtSignal(str)

    def __init__(self, description: str, call: Callable[[EngineCallTask], dict[str, Any]],
                 flags: QgsTask.Flag = QgsTask.Flag.CanCancel) -> None:
        super().__init__(description, flags)
        self.call = call
        self.record: dict[str, Any] | None = None
        self.error = ""

    def run(self) -> bool:
        try:
            self.record = self.call(self)
        except EngineError as error:
            self.error = "Cancelled." if error.kind == "cancelled" else str(error)
        except Exception as error:  # noqa: BLE001 - a task must not raise; its caller shows the reason
            self.error = f"{type(error).__name__}: {error}"
        return self.record is not None

    def report(self, percent: float, stage: str) -> None:
        """Engine progress (worker thread) into the task's progress and `stage_changed`."""
        self.setProgress(percent)
        self.stage_changed.emit(stage)

    def finished(self, result: bool) -> None:
        self.completed.emit(self.record, self.error or ("" if result else "Cancelled."))


class ProbeTask(EngineCallTask):
    """Asks the engine which device it would use (`record`: the probe's answer); `probed(description, ok)`
    reports it on the main thread."""

    probed = pyqtSignal(str, bool)

    def __init__(self, engine: EngineClient) -> None:
        super().__init__("TreeSeg: starting the engine", lambda _: engine.probe(),
                         QgsTask.Flag.CanCancel | QgsTask.Flag.CancelWithoutPrompt)

    def finished(self, result: bool) -> None:
        if result and self.record is not None:
            no_gpu = " · no GPU found: runs on the CPU" if self.record["device"] == "cpu" else ""
            self.probed.emit(f"{self.record['device_description']} · torch {self.record['torch']}{no_gpu}", True)
        else:
            self.probed.emit(self.error or "The engine did not answer.", False)


def clear_messages(message_bar: QgsMessageBar) -> None:
    """Take TreeSeg's messages (a summary, an error) off the message bar: they stay until the next run."""
    if not isinstance(message_bar, QgsMessageBar):  # pytest-qgis's stand-in has no items
        return
    for item in message_bar.items():
        if item.title() == MESSAGE_TITLE:
            message_bar.popWidget(item)


def _remove_outputs(paths: list[str]) -> None:
    """Delete the files of a replaced teach run; one still locked (Windows) stays and is logged."""
    for path in paths:
        try:
            remove_files([Path(path)])
        except OSError as error:
            QgsMessageLog.logMessage(f"Could not delete {path}: {error.strerror}", LOG_TAG, Qgis.MessageLevel.Info)


def _log(level: str, message: str) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, LOG_LEVELS.get(level, Qgis.MessageLevel.Info))
