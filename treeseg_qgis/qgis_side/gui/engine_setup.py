"""The engine set-up dialog: make, repair or remove the engine's private environment, or choose an existing one.

The commands come from engine_env; they run one after the other through QProcess, so QGIS stays
responsive, their output shows live in the log and Cancel kills the running one. The package indexes are
probed before pip (an unreachable extra index, the torch index or one of the user's, is a choice: go on
without it, or stop to fix it). A new engine is built in a staging folder and moved into place only once it
passed its check, so a failed or cancelled attempt leaves the engine in use as it was; its staging folder is set
aside at once and deleted in the background. Folders left by a set-up that was killed are offered for deletion.
Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from qgis.core import QgsApplication, QgsTask
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, pyqtSignal
from qgis.PyQt.QtGui import QFontDatabase, QTextCursor
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QWidget,
)

from ... import __version__
from ...memory import folder_bytes
from .. import engine_env
from ..engine_client import (
    choose_engine_python,
    chosen_engine_python,
    configured_engine_origin,
    configured_engine_python,
)
from .layouts import LayoutItem, button, fill_form, hbox, line_edit, show_status, vbox, wrapped_label

INTRO = (
    "TreeSeg runs DINOv3 in a Python environment of its own, beside QGIS: a virtual environment in "
    "your QGIS profile folder, made from the Python QGIS runs on, with torch, transformers, scikit-learn "
    "and scikit-image at the versions this plugin was tested with. QGIS's own Python is not modified; pip "
    "uses your own settings (index, proxy, certificates). The download is about 1 GB with CPU torch and "
    "a few GB with CUDA torch."
)
LOG_LINES = 5000
# The share of the progress bar each kind of step of a set-up plan takes.
STEP_WEIGHTS = {engine_env.VENV: 5, engine_env.PROBE: 2, engine_env.PINS: 1, engine_env.PIP: 74,
                engine_env.CHECK: 15, engine_env.SWAP: 3}
PROGRESS_RANGE = 1000
# How often the install's progress is read from the new environment while pip installs (it prints nothing then).
INSTALL_POLL_MS = 1000
# Folders being deleted in the background, each with its task: they outlive the dialog that set them aside, and
# nothing lists, measures or offers them meanwhile.
_DELETING: dict[Path, QgsTask] = {}


def command_text(command: tuple[str, ...]) -> str:
    """A command line for the log, with an inline script shown as '…'."""
    return shlex.join("…" if "\n" in part or part.startswith("{") else part for part in command)


def plain_requirement(requirement: str) -> str:
    """'torch==2.13.0' as 'torch 2.13.0'."""
    return re.sub(r"\s*==\s*", " ", requirement.strip())


def delete_in_background(folders: list[Path], description: str,
                         on_finished: Callable[[Exception | None], None] = lambda exception: None) -> QgsTask:
    """Delete folders already set aside (old-*) in a QGIS task, then call `on_finished` with what stopped it.
    Only set-aside folders come here: the dialog reads the engines folder while the task runs, and an engine
    folder deleted in place would be half there."""
    def delete(task: QgsTask) -> None:
        for folder in folders:
            engine_env.remove_environment(folder)

    def finished(exception: Exception | None) -> None:
        for folder in folders:
            _DELETING.pop(folder, None)
        on_finished(exception)

    task = QgsTask.fromFunction(description, delete, on_finished=finished)
    _DELETING.update(dict.fromkeys(folders, task))
    QgsApplication.taskManager().addTask(task)
    return task


def discard(folder: Path) -> None:
    """Set a staging folder aside at once (old-…) and delete it in the background; nothing waits for it. When it
    cannot even be renamed it stays, and the next dialog offers it for deletion."""
    try:
        aside = engine_env.set_aside(folder)
    except (OSError, engine_env.EngineEnvError):
        return
    delete_in_background([aside], "TreeSeg: deleting a half-made engine")


class EngineSetupDialog(QDialog):
    """Sets up the engine in `engines_root` (by default the `treeseg` folder of the QGIS profile).

    `engine_ready(python)` follows a successful set-up or a chosen Python that passed the check;
    `stop_engine_requested()` comes before Remove, or a set-up's swap, changes an engine's files;
    `engine_removed()` follows Remove.
    """

    engine_ready = pyqtSignal(str)
    stop_engine_requested = pyqtSignal()
    engine_removed = pyqtSignal()

    def __init__(self, engines_root: Path | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("TreeSeg: set up the engine")
        self.engines_root = engines_root or engine_env.engines_dir(QgsApplication.qgisSettingsDirPath())
        self.process: QProcess | None = None
        self.plan: engine_env.Plan | None = None
        self._steps: list[engine_env.Step] = []
        self._step_index = 0
        self._on_success: Callable[[], None] = lambda: None
        self._cancelled = False
        self._step_log = ""
        self._pip = engine_env.PipProgress()
        self._remove_task: QgsTask | None = None
        self._gpu_process: QProcess | None = None
        self._install_timer = 0
        try:
            self.requirements = engine_env.engine_requirements()
            self.base_python: str | None = engine_env.find_base_python()
            self.base_problem = ""
        except engine_env.EngineEnvError as problem:
            self.requirements = []
            self.base_python, self.base_problem = None, str(problem)
        self._build()
        self._detect_gpus()
        self._offer_leftovers()
        self._update_state()
        if self._current_engine() is not None:
            self._show_status(f"Ready: {self.private_engine().folder.name} was made for exactly these package "
                              f"versions, so it is used as it is (a plugin update that keeps them downloads nothing).")

    @property
    def running(self) -> bool:
        """A set-up, a check or a removal is under way."""
        return bool(self._steps) or self._remove_task is not None

    def private_engine(self) -> engine_env.Engine | None:
        """The ready private engine in use (one made for these requirements first), or None."""
        return engine_env.engine_in_use(self.engines_root, self.requirements)

    def _current_engine(self) -> engine_env.Engine | None:
        """The private engine when it was made for exactly these requirements (nothing to install), else None."""
        engine = self.private_engine()
        return engine if engine is not None and set(engine.requirements) == set(self.requirements) else None

    def retry_button(self) -> str:
        """The button that tries a set-up again, as failure messages name it: Repair once the current engine
        exists, Install otherwise (Repair is disabled without an engine)."""
        return "Repair" if self._current_engine() is not None else "Install"

    def _build(self) -> None:
        """The dialog: what gets installed and where, the actions and their progress and log, an existing Python."""
        close_box = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.setLayout(vbox(wrapped_label(INTRO), self._build_engine_form(), self._build_leftover_row(),
                            *self._build_actions(), self._build_existing_python(), close_box))
        self.resize(780, 640)
        self._connect()
        close_box.rejected.connect(self.reject)

    def _build_engine_form(self) -> QFormLayout:
        """The packages, the engines folder, the Python it is made from, the torch build and index, the engine
        in use."""
        self.packages_label = wrapped_label(", ".join(map(plain_requirement, self.requirements))
                                            + f": the versions TreeSeg {__version__} was tested with")
        self.folder_label = wrapped_label(selectable=True)
        self.base_label = wrapped_label(selectable=True)
        show_status(self.base_label, self.base_python or self.base_problem, error=self.base_python is None)
        self.build_combo = QComboBox()
        self.build_combo.addItem("CPU", engine_env.CPU)
        self.build_combo.setToolTip("CUDA is offered when nvidia-smi finds an NVIDIA GPU.")
        self.gpu_label = wrapped_label("Looking for an NVIDIA GPU…")
        self.torch_index = line_edit(
            engine_env.default_torch_index(engine_env.CPU),
            tooltip="Added to your pip indexes for torch's CPU or CUDA build. Empty for none, when your "
                    "organisation's mirror has torch: on Linux the CPU engine then asks it for torch's CPU build (a "
                    "version ending in +cpu), never PyPI's CUDA one.")
        self.engine_label = wrapped_label(selectable=True)
        return fill_form(
            QFormLayout(),
            ("Packages", self.packages_label),
            ("Engines folder", self.folder_label),
            ("Made from", self.base_label),
            ("torch", self.build_combo),
            ("", self.gpu_label),
            ("torch index", self.torch_index),
            ("Engine in use", self.engine_label),
        )

    def _build_leftover_row(self) -> QWidget:
        """The folders a killed set-up left, with a Delete button; hidden until `_offer_leftovers` finds some."""
        self.leftover_label = wrapped_label()
        self.leftover_button = button("Delete", "Delete these folders (in the background).", self.remove_leftovers)
        self.leftover_row = QWidget()
        self.leftover_row.setLayout(hbox((self.leftover_label, 1), self.leftover_button))
        self.leftover_row.setVisible(False)
        return self.leftover_row

    def _build_actions(self) -> tuple[LayoutItem, ...]:
        """Install, Repair, Remove and Cancel; the progress, the status, the troubleshooting link and the log."""
        self.install_button = button("Install", "Build the engine aside, check it, then put it in place.", self.install)
        self.repair_button = button("Repair", "Build the engine again from scratch (also switches between CPU and CUDA "
                                              "torch); the engine in use stays until the new one passed its check.",
                                    self.install)
        self.remove_button = button("Remove…", "Delete the private engine's folder.", self.remove)
        self.cancel_button = button("Cancel", clicked=self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, PROGRESS_RANGE)
        self.progress_bar.setValue(0)
        self.status_label = wrapped_label(selectable=True)
        help_label = QLabel(f'<a href="{engine_env.TROUBLESHOOTING_URL}">Troubleshooting: what each message '
                            f'means, where the engine lives, how to repair or remove it</a>')
        help_label.setOpenExternalLinks(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        return (hbox(self.install_button, self.repair_button, self.remove_button, self.cancel_button),
                self.progress_bar, self.status_label, help_label, (self.log, 1))

    def _build_existing_python(self) -> QgsCollapsibleGroupBox:
        """The closed 'Advanced' group: the Python of an environment the user made, and Use this Python."""
        self.python_widget = QgsFileWidget()
        self.python_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.python_widget.setDialogTitle("The Python of an environment with torch and transformers")
        self.python_widget.setFilePath(chosen_engine_python())
        self.use_python_button = button("Use this Python", clicked=self.use_existing_python)
        advanced = QgsCollapsibleGroupBox("Advanced: use an existing Python environment")
        advanced_note = wrapped_label("Instead of the private environment, run the engine with the Python of an "
                                      "environment you made yourself (it needs the packages of requirements.txt "
                                      "and GDAL's Python bindings). It is checked before it is used.")
        advanced.setLayout(vbox(advanced_note, hbox((self.python_widget, 1), self.use_python_button)))
        advanced.setCollapsed(True)
        return advanced

    def _connect(self) -> None:
        self.python_widget.fileChanged.connect(self._update_state)
        self.build_combo.currentIndexChanged.connect(self._build_changed)

    def install(self) -> None:
        """Build the engine of the chosen torch build in a staging folder, check it, and move it into place."""
        if self.base_python is None or self.running:
            return
        build = self.build_combo.currentData()
        problem = engine_env.free_disk_problem(self.engines_root, build)
        if problem:
            self._finish(problem, error=True)
            return
        try:
            self.plan = engine_env.install_plan(self.engines_root, self.base_python, build, self.torch_index.text(),
                                                self.requirements)
        except engine_env.EngineEnvError as error:
            self._finish(str(error), error=True)
            return
        self.engines_root.mkdir(parents=True, exist_ok=True)
        self._run(self.plan.steps, self._set_up_done)

    def use_existing_python(self) -> None:
        """Check the chosen Python off the UI thread; when it can run the engine, use and remember it."""
        python = self.python_widget.filePath().strip()
        if not python or self.running:
            return

        def use_it() -> None:
            choose_engine_python(python)
            self._finish(f"TreeSeg uses {python} from now on.")
            self.engine_ready.emit(python)

        self.plan = None
        self._run([engine_env.Step(f"Checking {python}", engine_env.check_command(python), engine_env.CHECK)],
                  use_it)

    def remove(self) -> None:
        """After confirmation, delete the private engine in use (in a background task)."""
        engine = self.private_engine()
        if self.running or engine is None:
            return
        answer = QMessageBox.question(
            self, "Remove the TreeSeg engine", f"Delete {engine.folder} and everything installed in it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.stop_engine_requested.emit()
        self._remove_folders([engine.folder], f"Removed {engine.folder}.", self.engine_removed.emit)

    def remove_leftovers(self) -> None:
        """Delete the folders a killed set-up left (in a background task)."""
        folders = [folder for folder in engine_env.leftover_folders(self.engines_root) if folder not in _DELETING]
        if self.running or not folders:
            return
        self.leftover_row.setVisible(False)
        self._remove_folders(folders, f"Deleted {', '.join(folder.name for folder in folders)}.")

    def cancel(self) -> None:
        """Stop the running command; the steps after it do not run. The swap (a rename) is not cancelled."""
        if self._cancellable():
            self._cancelled = True
            self._show_status("Cancelling…")
            self.process.kill()

    def reject(self) -> None:
        """Closing the dialog cancels what is running."""
        self.cancel()
        super().reject()

    def shutdown(self) -> None:
        """Cancel what is running and close (the plugin is unloading)."""
        self.reject()

    def _set_up_done(self) -> None:
        choose_engine_python(None)
        self.python_widget.setFilePath("")
        new = self.plan.target if self.plan else None
        self.plan = None
        python = str(engine_env.venv_python(new)) if new else ""
        self._finish(f"The engine is ready: {python}. TreeSeg uses it from now on.")
        self.engine_ready.emit(python)
        old = sorted(folder for folder in self.engines_root.iterdir() if folder.is_dir() and folder != new
                     and folder not in _DELETING and folder.name.startswith(("engine-", "staging-", "old-")))
        if old and QMessageBox.question(
                self, "Remove the old TreeSeg engines",
                "These engines (made for other package versions or another Python, by an earlier plugin, or left "
                "half-made) are no "
                "longer used:\n"
                + "\n".join(str(folder) for folder in old) + "\nDelete them?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.Yes) == QMessageBox.StandardButton.Yes:
            self._remove_folders(old, f"The engine is ready: {python}. The old engines were removed.")

    def _run(self, steps: list[engine_env.Step], on_success: Callable[[], None]) -> None:
        self._steps = list(steps)
        self._on_success = on_success
        self._cancelled = False
        self.log.clear()
        self.progress_bar.setValue(0)
        self._start_step(0)

    def _start_step(self, index: int) -> None:
        step = self._steps[index]
        self._step_index = index
        self._step_log = ""
        self._pip = engine_env.PipProgress()
        self._stop_install_timer()
        self._show_progress(0.0)
        self._show_status(f"Step {index + 1} of {len(self._steps)}: {step.title}…")
        self._append(f"== {step.title}\n$ {command_text(step.command)}\n")
        if step.swaps_engine and self.plan is not None and self.plan.target.exists():
            self.stop_engine_requested.emit()
        environment = QProcessEnvironment()
        for name, value in engine_env.step_environment(step, os.environ).items():
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
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", errors="replace")
        self._step_log += text
        self._append(text)
        if self.plan is not None and self._steps[self._step_index].kind == engine_env.PIP:
            self._pip.feed(text)
            if self._pip.installing and not self._install_timer:
                self._install_timer = self.startTimer(INSTALL_POLL_MS)
            self._show_pip_progress()

    def timerEvent(self, event) -> None:  # noqa: N802 - Qt's name
        """While pip installs (it prints nothing then), count the packages already in the new environment."""
        if event.timerId() != self._install_timer or self.plan is None:
            return super().timerEvent(event)
        self._pip.count_installed(self.plan.staging)
        self._show_pip_progress()

    def _show_pip_progress(self) -> None:
        self._show_progress(self._pip.fraction())
        self._show_status(f"Step {self._step_index + 1} of {len(self._steps)}: pip: {self._pip.describe()}…")

    def _stop_install_timer(self) -> None:
        if self._install_timer:
            self.killTimer(self._install_timer)
            self._install_timer = 0

    def _show_progress(self, fraction_of_step: float) -> None:
        """The bar over the whole plan: the finished steps' shares and `fraction_of_step` of this one's."""
        weights = [STEP_WEIGHTS.get(step.kind, 1) for step in self._steps]
        done = sum(weights[:self._step_index]) + weights[self._step_index] * fraction_of_step
        self.progress_bar.setValue(int(PROGRESS_RANGE * done / sum(weights)))

    def _step_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read_output()
        process, self.process = self.process, None
        if process is not None:
            process.deleteLater()
        self._stop_install_timer()
        step = self._steps[self._step_index]
        normal = exit_status == QProcess.ExitStatus.NormalExit
        if self._cancelled:
            self._failed("Cancelled.")
        elif normal and step.kind == engine_env.PROBE and exit_code == engine_env.PROBE_INDEX_UNREACHABLE:
            self._failed(engine_env.unreachable_message(engine_env.read_probe(self._step_log), self.retry_button()))
        elif normal and step.kind == engine_env.PROBE and exit_code == engine_env.PROBE_EXTRA_UNREACHABLE:
            self._extra_index_unreachable(engine_env.read_probe(self._step_log))
        elif not normal or exit_code != 0:
            reason = f"exit code {exit_code}" if normal else "it crashed"
            cause = engine_env.explain_pip_failure(self._step_log, self.retry_button()) \
                if step.kind == engine_env.PIP and self.plan else "The log says why."
            self._failed(f"{step.title} failed ({reason}). {cause}")
        elif self._step_index + 1 < len(self._steps):
            self._start_step(self._step_index + 1)
        else:
            self.progress_bar.setValue(PROGRESS_RANGE)
            self._steps = []
            self._on_success()

    def _extra_index_unreachable(self, checks: list[engine_env.IndexCheck]) -> None:
        """Only extra indexes (the torch index, the user's extra ones) did not answer: go on without them (the
        rest of the plan made again without them, same staging folder), or stop to fix them."""
        build = self.build_combo.currentData()
        torch_pin = next((requirement for requirement in engine_env.pip_requirements(self.requirements, build)
                          if requirement.lower().startswith("torch")), "torch")
        dead = sum(bool(check.problem) for check in checks)
        box = QMessageBox(QMessageBox.Icon.Question, "TreeSeg: a package index does not answer",
                          engine_env.extra_index_choice(checks, torch_pin), QMessageBox.StandardButton.NoButton,
                          self)
        go_on = box.addButton("Go on without it" if dead == 1 else "Go on without them",
                              QMessageBox.ButtonRole.AcceptRole)
        box.addButton("Stop", QMessageBox.ButtonRole.RejectRole)
        box.exec()
        if box.clickedButton() is not go_on or self.plan is None or self._cancelled:
            self._failed(engine_env.stopped_message(checks, self.retry_button()))
            return
        torch_index, extra_indexes = engine_env.without_dead_extras(checks, self.torch_index.text())
        self.torch_index.setText(torch_index)
        self._append("== Going on without " + ", ".join(f"{check.url} ({check.source})" for check in checks
                                                         if check.problem) + ".\n")
        self.plan = engine_env.install_plan(self.engines_root, self.base_python, build, torch_index,
                                            self.requirements, extra_indexes)
        next_step = self._step_index + 1
        self._steps = list(self.plan.steps)
        self._start_step(next_step)

    def _failed(self, message: str) -> None:
        """End a set-up that did not finish: the engine in use stays and is named; the staging folder is set
        aside at once and deleted in the background, so the message does not wait for it."""
        staging = self.plan.staging if self.plan is not None else None
        self.plan = None
        self.progress_bar.setValue(0)
        if staging is None:
            self._finish(message, error=not message.startswith("Cancelled"))
            return
        engine = configured_engine_python()
        kept = f"Nothing was installed; the engine in use is still {engine}." if engine else \
            "Nothing was installed; there is no engine yet."
        if staging.exists():
            discard(staging)
        self._finish(f"{message} {kept}", error=not message.startswith("Cancelled"))

    def _process_error(self, error: QProcess.ProcessError) -> None:
        if error != QProcess.ProcessError.FailedToStart or self.process is None:
            return
        process, self.process = self.process, None
        self._append(f"{process.errorString()}\n")
        process.deleteLater()
        self._failed(f"{self._steps[self._step_index].command[0]} could not be started.")

    def _finish(self, message: str, error: bool = False) -> None:
        self._steps = []
        self._show_status(message, error)
        self._update_state()

    def _remove_folders(self, folders: list[Path], done: str, after: Callable[[], None] = lambda: None,
                        error: bool = False) -> None:
        """Set engine or staging folders aside at once (renamed old-*: no engine is ever seen half deleted), delete
        them in a background task, then show `done` and call `after`."""
        aside, refused = [], []
        for folder in folders:
            try:
                aside.append(folder if folder.name.startswith("old-") else engine_env.set_aside(folder))
            except (OSError, engine_env.EngineEnvError) as exception:
                refused.append(f"{folder} ({exception})")

        def removed(exception: Exception | None) -> None:
            self._remove_task = None
            if exception is not None or refused:
                problems = refused + ([f"{', '.join(map(str, aside))} ({exception})"] if exception else [])
                self._finish(f"Could not remove {'; '.join(problems)}", error=True)
                return
            self._finish(done, error)
            after()

        self._show_status(f"Removing {', '.join(map(str, folders))}…", error)
        self._remove_task = delete_in_background(aside, "TreeSeg: removing an engine", removed)
        self._update_state()

    def _build_changed(self) -> None:
        self.torch_index.setText(engine_env.default_torch_index(self.build_combo.currentData()))

    def _detect_gpus(self) -> None:
        command = engine_env.gpu_query_command()
        if command is None:
            self.gpu_label.setText("No NVIDIA GPU found (no nvidia-smi): the CPU engine will be installed.")
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
            self.gpu_label.setText("No NVIDIA GPU found (nvidia-smi lists none): the CPU engine will be installed.")
            return
        gpu = gpus[0]
        build = engine_env.cuda_build(gpu.driver)
        if build is None:
            self.gpu_label.setText(f"{gpu.name} found, but its NVIDIA driver {gpu.driver} is too old for PyTorch's "
                                   f"CUDA builds; update the driver to use it. The CPU engine will be installed.")
            return
        self.gpu_label.setText(f"{gpu.name} found: the CUDA engine ({build}) will be installed.")
        self.build_combo.addItem(f"CUDA ({build}): {gpu.name}, {gpu.memory_mib / 1024:.0f} GB", build)
        self.build_combo.setCurrentIndex(self.build_combo.count() - 1)

    def _offer_leftovers(self) -> None:
        """Name the folders a killed set-up left (never used), with their size, beside a Delete button."""
        folders = [folder for folder in engine_env.leftover_folders(self.engines_root) if folder not in _DELETING]
        if not folders:
            return
        sizes = ", ".join(f"{folder.name} ({folder_bytes(folder) / 1024**2:.0f} MB)" for folder in folders)
        self.leftover_label.setText(f"Left by a set-up that did not finish, never used: {sizes}.")
        self.leftover_row.setVisible(True)

    def _update_state(self) -> None:
        running = self.running
        engine = self.private_engine()
        current = self._current_engine() is not None
        can_set_up = self.base_python is not None and not running
        self.install_button.setEnabled(can_set_up and not current)
        self.repair_button.setEnabled(can_set_up and engine is not None)
        self.remove_button.setEnabled(not running and engine is not None)
        self.leftover_button.setEnabled(not running)
        self.cancel_button.setEnabled(self._cancellable())
        self.build_combo.setEnabled(not running)
        self.torch_index.setEnabled(not running)
        self.use_python_button.setEnabled(not running and bool(self.python_widget.filePath().strip()))
        found = configured_engine_origin()
        in_use, origin = found if found else (None, "")
        # Enter must not start an install beside an engine that works (one `make deploy` recorded, say).
        self.install_button.setAutoDefault(in_use is None)
        stale = engine_env.other_python_engines(self.engines_root)
        if engine is None and stale:
            installed = (f"installed: {stale[0].folder.name}, made from Python {stale[0].python_version}, but QGIS "
                         f"now runs Python {engine_env.PYTHON_VERSION}: it cannot be used; Install makes a new one")
        elif engine is None and in_use:
            installed = "none made here; TreeSeg runs on the engine below"
        elif engine is None:
            installed = "no engine installed"
        elif current:
            installed = f"installed: {engine.folder.name} ({engine.build})"
        else:
            installed = (f"installed: {engine.folder.name}, made for other package versions than this plugin's; "
                         f"Install makes a new one")
        self.folder_label.setText(f"{self.engines_root} ({installed})")
        self.engine_label.setText(f"{in_use} ({origin})" if in_use else "none")

    def _cancellable(self) -> bool:
        return self.process is not None and not (self._steps and self._steps[self._step_index].swaps_engine)

    def _show_status(self, text: str, error: bool = False) -> None:
        show_status(self.status_label, text, error)

    def _append(self, text: str) -> None:
        self.log.moveCursor(QTextCursor.MoveOperation.End)
        self.log.insertPlainText(text.replace("\r\n", "\n").replace("\r", "\n"))
        self.log.moveCursor(QTextCursor.MoveOperation.End)
