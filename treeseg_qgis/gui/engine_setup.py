"""The engine set-up dialog: make, repair or remove the engine's private environment, or choose an existing one.

The commands come from engine_env; they run one after the other through QProcess, so QGIS stays
responsive, their output shows live in the log and Cancel kills the running one. Nothing here
imports torch.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

from qgis.core import QgsApplication, QgsSettings, QgsTask
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, Qt, pyqtSignal
from qgis.PyQt.QtGui import QFontDatabase, QTextCursor
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .. import engine_env
from ..engine_client import find_engine_python
from ..processing.engine_algorithm import ENGINE_PYTHON_SETTING

INTRO = (
    "TreeSeg runs DINOv3 in a Python environment of its own, beside QGIS: a virtual environment in "
    "your QGIS profile folder, made from the Python QGIS runs on, with torch, transformers, scikit-learn "
    "and scikit-image at the versions this plugin was tested with. QGIS's own Python is not modified. "
    "The download is several hundred MB with CPU torch and a few GB with CUDA torch."
)
SET_UP_CANCELLED = "Cancelled. The environment may be incomplete: Repair completes it, Remove deletes it."
ERROR_STYLE = "color: #b00020;"
LOG_LINES = 5000


def command_text(command: tuple[str, ...]) -> str:
    """A command line for the log, with an inline script shown as '…'."""
    return shlex.join("…" if "\n" in part else part for part in command)


class EngineSetupDialog(QDialog):
    """Sets up the engine's environment in `venv_dir` (by default the private one of the QGIS profile).

    `engine_ready(python)` follows a successful set-up or a chosen Python that passed the check;
    `stop_engine_requested()` comes before Repair or Remove change the environment's files;
    `engine_removed()` follows Remove.
    """

    engine_ready = pyqtSignal(str)
    stop_engine_requested = pyqtSignal()
    engine_removed = pyqtSignal()

    def __init__(self, venv_dir: Path | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("TreeSeg: set up the engine")
        self.venv_dir = venv_dir or engine_env.engine_venv_dir(QgsApplication.qgisSettingsDirPath())
        self.process: QProcess | None = None
        self._steps: list[engine_env.Step] = []
        self._step_index = 0
        self._on_success: Callable[[], None] = lambda: None
        self._cancelled_note = ""
        self._cancelled = False
        self._remove_task: QgsTask | None = None
        self._gpu_process: QProcess | None = None
        try:
            self.base_python: str | None = engine_env.find_base_python()
            self.base_problem = ""
        except engine_env.EngineEnvError as problem:
            self.base_python, self.base_problem = None, str(problem)
        self._build()
        self._detect_gpus()
        self._update_state()

    @property
    def running(self) -> bool:
        """A set-up, a check or a removal is under way."""
        return bool(self._steps) or self._remove_task is not None

    def _build(self) -> None:
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        self.folder_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.base_label = QLabel(self.base_python or self.base_problem)
        self.base_label.setWordWrap(True)
        self.base_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        if self.base_python is None:
            self.base_label.setStyleSheet(ERROR_STYLE)
        self.build_combo = QComboBox()
        self.build_combo.addItem("CPU", engine_env.CPU)
        self.build_combo.setToolTip("CUDA is offered when nvidia-smi finds an NVIDIA GPU.")
        self.gpu_label = QLabel()
        self.gpu_label.setWordWrap(True)
        self.gpu_label.hide()
        self.engine_label = QLabel()
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.install_button = QPushButton("Install")
        self.install_button.setToolTip("Create the environment and install the engine packages into it.")
        self.repair_button = QPushButton("Repair")
        self.repair_button.setToolTip("Run the installation again into the existing environment, reinstalling "
                                      "the engine packages (this also switches between CPU and CUDA torch).")
        self.remove_button = QPushButton("Remove…")
        self.remove_button.setToolTip("Delete the environment's folder.")
        self.cancel_button = QPushButton("Cancel")
        self.progress_bar = QProgressBar()
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))

        self.python_widget = QgsFileWidget()
        self.python_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.python_widget.setDialogTitle("The Python of an environment with torch and transformers")
        self.python_widget.setFilePath(QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str))
        self.use_python_button = QPushButton("Use this Python")
        advanced = QgsCollapsibleGroupBox("Advanced: use an existing Python environment")
        advanced_note = QLabel("Instead of the private environment, run the engine with the Python of an "
                               "environment you made yourself (it needs the packages of requirements.txt "
                               "and GDAL's Python bindings). It is checked before it is used.")
        advanced_note.setWordWrap(True)
        python_row = QHBoxLayout()
        python_row.addWidget(self.python_widget, 1)
        python_row.addWidget(self.use_python_button)
        advanced_column = QVBoxLayout()
        advanced_column.addWidget(advanced_note)
        advanced_column.addLayout(python_row)
        advanced.setLayout(advanced_column)
        advanced.setCollapsed(True)

        form = QFormLayout()
        form.addRow("Folder", self.folder_label)
        form.addRow("Made from", self.base_label)
        form.addRow("torch", self.build_combo)
        form.addRow("", self.gpu_label)
        form.addRow("Engine in use", self.engine_label)
        buttons = QHBoxLayout()
        for button in (self.install_button, self.repair_button, self.remove_button, self.cancel_button):
            buttons.addWidget(button)
        close_box = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        column = QVBoxLayout()
        column.addWidget(intro)
        column.addLayout(form)
        column.addLayout(buttons)
        column.addWidget(self.progress_bar)
        column.addWidget(self.status_label)
        column.addWidget(self.log, 1)
        column.addWidget(advanced)
        column.addWidget(close_box)
        self.setLayout(column)
        self.resize(760, 600)

        self.install_button.clicked.connect(self.install)
        self.repair_button.clicked.connect(self.repair)
        self.remove_button.clicked.connect(self.remove)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_python_button.clicked.connect(self.use_existing_python)
        self.python_widget.fileChanged.connect(self._update_state)
        close_box.rejected.connect(self.reject)

    def install(self) -> None:
        """Create the environment and install the engine packages, with the chosen torch build."""
        self._set_up(repair=False)

    def repair(self) -> None:
        """Run the installation again into the existing environment."""
        self._set_up(repair=True)

    def use_existing_python(self) -> None:
        """Check the chosen Python off the UI thread; when it can run the engine, use and remember it."""
        python = self.python_widget.filePath().strip()
        if not python or self.running:
            return

        def use_it() -> None:
            QgsSettings().setValue(ENGINE_PYTHON_SETTING, python)
            self._finish(f"TreeSeg uses {python} from now on.")
            self.engine_ready.emit(python)

        self._run([engine_env.Step(f"Checking {python}", engine_env.check_command(python))], use_it, "Cancelled.")

    def remove(self) -> None:
        """After confirmation, delete the environment's folder (in a background task)."""
        if self.running or not self.venv_dir.exists():
            return
        answer = QMessageBox.question(
            self, "Remove the TreeSeg engine", f"Delete {self.venv_dir} and everything installed in it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.stop_engine_requested.emit()
        self._show_status(f"Removing {self.venv_dir}…")
        self._remove_task = QgsTask.fromFunction(f"TreeSeg: removing {self.venv_dir}", self._remove_files,
                                                 on_finished=self._removed)
        QgsApplication.taskManager().addTask(self._remove_task)
        self._update_state()

    def cancel(self) -> None:
        """Stop the running command; the steps after it do not run."""
        if self.process is not None:
            self._cancelled = True
            self._show_status("Cancelling…")
            self.process.kill()

    def reject(self) -> None:
        """Closing the dialog cancels what is running."""
        self.cancel()
        super().reject()

    def _set_up(self, repair: bool) -> None:
        if self.base_python is None or self.running:
            return
        try:
            steps = engine_env.install_plan(self.venv_dir, self.base_python, self.build_combo.currentData(), repair)
        except engine_env.EngineEnvError as problem:
            self._finish(str(problem), error=True)
            return
        if repair:
            self.stop_engine_requested.emit()
        self._run(steps, self._set_up_done, SET_UP_CANCELLED)

    def _set_up_done(self) -> None:
        QgsSettings().remove(ENGINE_PYTHON_SETTING)
        self.python_widget.setFilePath("")
        python = str(engine_env.venv_python(self.venv_dir))
        self._finish(f"The engine is ready: {python}. TreeSeg uses it from now on.")
        self.engine_ready.emit(python)

    def _run(self, steps: list[engine_env.Step], on_success: Callable[[], None], cancelled_note: str) -> None:
        self._steps = list(steps)
        self._on_success = on_success
        self._cancelled_note = cancelled_note
        self._cancelled = False
        self.log.clear()
        self.progress_bar.setRange(0, len(steps))
        self._start_step(0)

    def _start_step(self, index: int) -> None:
        step = self._steps[index]
        self._step_index = index
        self.progress_bar.setValue(index)
        self._show_status(f"Step {index + 1} of {len(self._steps)}: {step.title}…")
        self._append(f"== {step.title}\n$ {command_text(step.command)}\n")
        environment = QProcessEnvironment()
        for name, value in engine_env.process_environment(os.environ).items():
            environment.insert(name, value)
        process = QProcess(self)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.setProcessEnvironment(environment)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._step_finished)
        process.errorOccurred.connect(self._process_error)
        self.process = process
        process.start(step.command[0], list(step.command[1:]))
        self._update_state()

    def _read_output(self) -> None:
        if self.process is not None:
            self._append(bytes(self.process.readAllStandardOutput()).decode("utf-8", errors="replace"))

    def _step_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read_output()
        process, self.process = self.process, None
        if process is not None:
            process.deleteLater()
        step = self._steps[self._step_index]
        if self._cancelled:
            self._finish(self._cancelled_note)
        elif exit_status != QProcess.ExitStatus.NormalExit or exit_code != 0:
            reason = f"exit code {exit_code}" if exit_status == QProcess.ExitStatus.NormalExit else "it crashed"
            self._finish(f"{step.title} failed ({reason}); the log says why.", error=True)
        elif self._step_index + 1 < len(self._steps):
            self._start_step(self._step_index + 1)
        else:
            self.progress_bar.setValue(len(self._steps))
            self._steps = []
            self._on_success()

    def _process_error(self, error: QProcess.ProcessError) -> None:
        if error != QProcess.ProcessError.FailedToStart or self.process is None:
            return
        process, self.process = self.process, None
        self._append(f"{process.errorString()}\n")
        process.deleteLater()
        self._finish(f"{self._steps[self._step_index].command[0]} could not be started.", error=True)

    def _finish(self, message: str, error: bool = False) -> None:
        self._steps = []
        self._show_status(message, error)
        self._update_state()

    def _remove_files(self, task: QgsTask) -> None:
        engine_env.remove_environment(self.venv_dir)

    def _removed(self, exception: Exception | None) -> None:
        self._remove_task = None
        if exception is not None:
            self._finish(f"Could not remove {self.venv_dir}: {exception}", error=True)
            return
        self._finish(f"Removed {self.venv_dir}.")
        self.engine_removed.emit()

    def _detect_gpus(self) -> None:
        command = engine_env.gpu_query_command()
        if command is None:
            return
        self._gpu_process = QProcess(self)
        self._gpu_process.finished.connect(self._gpus_detected)
        self._gpu_process.start(command[0], command[1:])

    def _gpus_detected(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        process, self._gpu_process = self._gpu_process, None
        output = bytes(process.readAllStandardOutput()).decode("utf-8", errors="replace")
        process.deleteLater()
        gpus = engine_env.parse_gpus(output) if exit_status == QProcess.ExitStatus.NormalExit else []
        if exit_code != 0 or not gpus:
            return
        gpu = gpus[0]
        build = engine_env.cuda_build(gpu.driver)
        if build is None:
            self.gpu_label.setText(f"{gpu.name}: its NVIDIA driver {gpu.driver} is too old for PyTorch's CUDA "
                                   f"builds; update the driver to use it. CPU torch works meanwhile.")
            self.gpu_label.show()
            return
        self.build_combo.addItem(f"CUDA ({build}): {gpu.name}, {gpu.memory_mib / 1024:.0f} GB", build)
        self.build_combo.setCurrentIndex(self.build_combo.count() - 1)

    def _update_state(self) -> None:
        running = self.running
        installed = engine_env.venv_python(self.venv_dir).is_file()
        can_set_up = self.base_python is not None and not running
        self.install_button.setEnabled(can_set_up and not installed)
        self.repair_button.setEnabled(can_set_up and self.venv_dir.exists())
        self.remove_button.setEnabled(not running and self.venv_dir.exists())
        self.cancel_button.setEnabled(self.process is not None)
        self.build_combo.setEnabled(not running)
        self.use_python_button.setEnabled(not running and bool(self.python_widget.filePath().strip()))
        self.folder_label.setText(f"{self.venv_dir} ({'installed' if installed else 'not installed'})")
        engine = find_engine_python(QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str) or None)
        self.engine_label.setText(engine or "none")

    def _show_status(self, text: str, error: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet(ERROR_STYLE if error else "")

    def _append(self, text: str) -> None:
        self.log.moveCursor(QTextCursor.MoveOperation.End)
        self.log.insertPlainText(text.replace("\r\n", "\n").replace("\r", "\n"))
        self.log.moveCursor(QTextCursor.MoveOperation.End)
