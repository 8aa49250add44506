"""The teach panel: after a run, clicks on the map teach trees (or any class) by example.

Clicks (gui/teach_tool.py) become pixel positions of the last run's input; a TeachTask sends them with
that run's `SegmentationParams`, so the engine reads the features the run cached instead of running the
model. The threshold is 0.5 on calibrated probabilities unless the user moves the slider, which re-teaches
after a short pause and replaces the teach layers. Classes added to the class list are taught at once: a click
marks the selected class, Shift+click or right click "other"; the list shows each class's colour (that of the
class raster) and how many examples it has.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsSettings
from qgis.gui import QgisInterface, QgsCollapsibleGroupBox
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QSlider,
    QWidget,
)

from ...outputs import CLASS_COLOURS
from ...params import SegmentationParams
from ...run_record import TeachRecord
from ..auth import hf_token
from ..engine_client import EngineClient
from ..raster_input import RasterGrid
from .layouts import button, check_box, hbox, show_status, vbox
from .run_params import free_output_stem
from .run_settings import SETTINGS_PREFIX
from .task import SegmentationTask, TeachTask
from .teach_tool import OTHER_CLASS, TeachMapTool

DEFAULT_THRESHOLD = 0.6
DEFAULT_CLASS = "tree"
TEACH_DEBOUNCE_MS = 300
TEACH_HELP = ("Name the class to teach (a tree, a dead tree, a roof…). Left click on the map: an example of it. "
              "Shift+click or right click: something else. The threshold is 0.5 on the calibrated class "
              "probability unless you move the slider. Teaching works on the input of the last run and reuses its "
              "cached features, so the model does not run again. To teach several classes at once, add each to "
              "the class list: a click then marks the selected class, Shift+click or right click 'other'.")
SWATCH_PX = 12


class TeachPanel(QgsCollapsibleGroupBox):
    """The 'Teach by clicking' group: the class, the map tool, the examples, the threshold and Apply.

    Closed until a run succeeds (`prepare`). `teaching_changed(bool)` tells when a teach run starts and
    ends, `progress_changed(percent)` follows it; `set_running(True)` keeps Apply disabled during a run.
    """

    teaching_changed = pyqtSignal(bool)
    progress_changed = pyqtSignal(float)

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__("Teach by clicking", parent)
        self.setObjectName("TreesegTeach")
        self.setSaveCollapsedState(False)
        self.iface = iface
        self.engine = engine
        self.teach_task: TeachTask | None = None
        self.teach_tool: TeachMapTool | None = None
        self._running = False
        self._last_run: SegmentationParams | None = None
        self._last_run_layer_id = ""
        self._last_run_scratch: Path | None = None
        self._teach_layer_ids: list[str] = []
        self._teach_outputs: list[str] = []
        self._teach_again = False
        self._classes: list[str] = []
        """The classes taught at once, in the order of their values in the class raster; empty: one class."""
        self._build()
        self._restore_settings()
        self._connect()
        self.setCollapsed(True)

    def _build(self) -> None:
        note = QLabel(TEACH_HELP)
        note.setWordWrap(True)
        self.teach_button = button("Click examples", "Click trees and not-trees on the map")
        self.teach_button.setCheckable(True)
        self.clear_examples_button = button("Clear", "Forget the examples clicked so far", self._clear_examples)
        self.examples_label = QLabel()
        self.examples_label.setWordWrap(True)
        self.class_edit = QLineEdit(DEFAULT_CLASS)
        self.class_edit.setToolTip("What the examples show; it names the outputs (e.g. dead tree → "
                                   "<stem>_taught_dead_tree.tif).")
        self.auto_threshold = check_box("Automatic threshold", "Leave one out over your clicks: each example is scored "
                                        "by the others, and the threshold that best separates the two kinds is used. "
                                        "Moving the slider sets the threshold yourself.")
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setToolTip("Pixels scoring at least this belong to the class. Moving it re-thresholds "
                                         "from the cached features.")
        self.threshold_label = QLabel()
        self.threshold_label.setMinimumWidth(self.threshold_label.fontMetrics().horizontalAdvance("0.000"))
        self.apply_teach_button = button("Apply", clicked=self.teach)
        self.teach_status = QLabel()
        self.teach_status.setWordWrap(True)
        self.teach_timer = QTimer(self)
        self.teach_timer.setSingleShot(True)
        self.teach_timer.setInterval(TEACH_DEBOUNCE_MS)
        self.add_class_button = button("Add class", "Teach several classes at once: add the class named on the left to "
                                       "the list; clicks then mark the selected class", self._add_class)
        self.remove_class_button = button("Remove class", "Take the selected class and its examples off the list",
                                          self._remove_class)
        self.class_list = QListWidget()
        self.class_list.setToolTip("The classes taught at once, in their colours in the class raster, with the "
                                   "number of examples of each; a click on the map marks the selected one")
        self.class_list.setMaximumHeight(5 * self.class_list.fontMetrics().height() + 8)
        self.class_list.setVisible(False)
        self.remove_class_button.setVisible(False)
        class_row = hbox(QLabel("Class"), (self.class_edit, 1), self.add_class_button)
        tool_row = hbox((self.teach_button, 1), self.clear_examples_button)
        threshold_row = hbox(QLabel("Threshold"), (self.threshold_slider, 1), self.threshold_label)
        self.setLayout(vbox(note, class_row, self.class_list, self.remove_class_button, tool_row, self.examples_label,
                            self.auto_threshold, threshold_row, self.apply_teach_button, self.teach_status))

    def _restore_settings(self) -> None:
        settings = QgsSettings()
        self._show_threshold(settings.value(SETTINGS_PREFIX + "teach_threshold", DEFAULT_THRESHOLD, type=float))
        self.auto_threshold.setChecked(settings.value(SETTINGS_PREFIX + "teach_threshold_auto", True, type=bool))
        self.class_edit.setText(settings.value(SETTINGS_PREFIX + "teach_class", DEFAULT_CLASS, type=str))
        self._show_examples()

    def _connect(self) -> None:
        self.teach_button.toggled.connect(self._toggle_teach_tool)
        self.threshold_slider.valueChanged.connect(self._threshold_moved)
        self.auto_threshold.toggled.connect(self._auto_threshold_toggled)
        self.class_edit.editingFinished.connect(self._show_examples)
        self.class_list.currentRowChanged.connect(self._class_chosen)
        self.teach_timer.timeout.connect(self._teach_again_or_now)

    def _update_enabled(self) -> None:
        teachable = self.engine is not None and self._last_run is not None
        self.teach_button.setEnabled(teachable)
        trees, others = self._example_counts()
        counts = self.teach_tool.class_counts() if self.teach_tool is not None else {}
        self.clear_examples_button.setEnabled(trees + others + sum(counts.values()) > 0)
        self.remove_class_button.setEnabled(self.class_list.currentRow() >= 0)
        busy = self._running or self.teach_task is not None
        ready = sum(count > 0 for count in counts.values()) >= 2 if self._classes else trees > 0
        self.apply_teach_button.setEnabled(teachable and not busy and ready)
        for widget in (self.auto_threshold, self.threshold_slider):
            widget.setEnabled(not self._classes)  # several classes: the most probable one, unsure under 0.5

    def set_engine(self, engine: EngineClient | None) -> None:
        """Use `engine` from now on (the set-up dialog made or removed one)."""
        self.engine = engine
        self._update_enabled()

    def set_running(self, running: bool) -> None:
        """A run is going on (teaching waits for it) or has ended."""
        self._running = running
        self._update_enabled()

    def prepare(self, task: SegmentationTask) -> None:
        """Teach on the input of this successful run from now on; the examples and the teach layers of a run on
        another grid start afresh."""
        self._keep_scratch(task.scratch_folder)
        self._last_run = task.params
        self._last_run_layer_id = task.layer_id
        grid = RasterGrid.of_file(self._last_run.input_path)
        if self.teach_tool is None:
            self.setCollapsed(False)
            self.teach_tool = TeachMapTool(self.iface.mapCanvas())
            self.teach_tool.setButton(self.teach_button)
            self.teach_tool.examples_changed.connect(self._show_examples)
            self._show_classes()
            self.teach_tool.click_ignored.connect(lambda: self._show_teach_status(
                "That click is off the raster of the last run; it was left out.", error=True))
        if grid != self.teach_tool.grid:
            self._teach_layer_ids, self._teach_outputs = [], []
        self.teach_tool.set_grid(grid)
        self._update_enabled()

    def _keep_scratch(self, folder: Path | None) -> None:
        """Keep `folder` (the last run's input VRT, or None) and remove the one kept before."""
        if self._last_run_scratch is not None and self._last_run_scratch != folder:
            shutil.rmtree(self._last_run_scratch, ignore_errors=True)
        self._last_run_scratch = folder

    def _toggle_teach_tool(self, checked: bool) -> None:
        canvas = self.iface.mapCanvas()
        if checked and canvas.mapTool() is not self.teach_tool:
            canvas.setMapTool(self.teach_tool)
        elif not checked and canvas.mapTool() is self.teach_tool:
            canvas.unsetMapTool(self.teach_tool)

    def _example_counts(self) -> tuple[int, int]:
        return self.teach_tool.counts() if self.teach_tool is not None else (0, 0)

    def _clear_examples(self) -> None:
        if self.teach_tool is not None:
            self.teach_tool.clear()

    def _taught_class(self) -> str:
        return self.class_edit.text().strip() or DEFAULT_CLASS

    def _add_class(self) -> None:
        """Add the class named in the Class field to the classes taught at once, and select it."""
        name = self._taught_class()
        if name not in self._classes:
            self._classes.append(name)
        self._show_classes()
        self.class_list.setCurrentRow(self._classes.index(name))

    def _remove_class(self) -> None:
        """Take the selected class and its examples off the list."""
        row = self.class_list.currentRow()
        if row < 0:
            return
        name = self._classes.pop(row)
        if self.teach_tool is not None:
            self.teach_tool.remove_class(name)
        self._show_classes()

    def _class_chosen(self, row: int) -> None:
        """Clicks mark the selected class from now on."""
        if self.teach_tool is not None:
            self.teach_tool.label = self._classes[row] if 0 <= row < len(self._classes) else None
        self._update_enabled()

    def class_colours(self) -> dict[str, QColor]:
        """The colour of each class taught at once: that of its value in the class raster."""
        return {name: QColor(*CLASS_COLOURS[index % len(CLASS_COLOURS)]) for index, name in enumerate(self._classes)}

    def _show_classes(self) -> None:
        """The class list: each class in its colour with its number of examples; the tool marks the selected
        one ('other' joins the list at its first Shift+click or right click)."""
        counts = self.teach_tool.class_counts() if self.teach_tool is not None else {}
        if counts.get(OTHER_CLASS) and OTHER_CLASS not in self._classes:
            self._classes.append(OTHER_CLASS)
        colours = self.class_colours()
        row = self.class_list.currentRow()
        self.class_list.blockSignals(True)
        self.class_list.clear()
        for name in self._classes:
            swatch = QPixmap(SWATCH_PX, SWATCH_PX)
            swatch.fill(colours[name])
            count = counts.get(name, 0)
            item = QListWidgetItem(QIcon(swatch), f"{name}: {count} example{'s' * (count != 1)}")
            item.setData(Qt.ItemDataRole.UserRole, name)
            self.class_list.addItem(item)
        self.class_list.setCurrentRow(min(max(row, 0), len(self._classes) - 1))
        self.class_list.blockSignals(False)
        self.class_list.setVisible(bool(self._classes))
        self.remove_class_button.setVisible(bool(self._classes))
        if self.teach_tool is not None:
            self.teach_tool.set_colours(colours)
        self._class_chosen(self.class_list.currentRow())

    def _show_examples(self) -> None:
        trees, others = self._example_counts()
        taught = self._taught_class()
        if self._classes:
            self._show_classes()
            self.examples_label.setText(f"Teaching {len(self._classes)} classes at once: a click marks the selected "
                                        "one, Shift+click or right click 'other'.")
        else:
            self.examples_label.setText(f"Examples: {trees} {taught}{'s' * (trees != 1)}, {others} not {taught}"
                                        f"{'s' * (others != 1)}." if trees or others else "No examples yet.")
        self._update_enabled()

    def _show_threshold(self, threshold: float) -> None:
        """Put a threshold on the slider without counting it as the user's."""
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(round(100 * threshold))
        self.threshold_slider.blockSignals(False)
        self.threshold_label.setText(f"{threshold:.2f}")

    def _threshold_moved(self, value: int) -> None:
        """The user's threshold: show it, stop choosing it from the examples, and once a teach result is
        shown re-teach with it after a short pause."""
        self.threshold_label.setText(f"{value / 100:.2f}")
        self.auto_threshold.blockSignals(True)
        self.auto_threshold.setChecked(False)
        self.auto_threshold.blockSignals(False)
        if self._teach_layer_ids:
            self.teach_timer.start()

    def _auto_threshold_toggled(self, checked: bool) -> None:
        QgsSettings().setValue(SETTINGS_PREFIX + "teach_threshold_auto", checked)
        if self._teach_layer_ids:
            self.teach_timer.start()

    def _wanted_threshold(self) -> float | None:
        """None: choose it from the examples; else the slider's value."""
        return None if self.auto_threshold.isChecked() else self.threshold_slider.value() / 100

    def _teach_again_or_now(self) -> None:
        if self.teach_task is not None:
            self._teach_again = True
        else:
            self.teach()

    def teach(self) -> None:
        """Score every pixel of the last run's input against the examples (a TeachTask); the similarity and
        the taught trees replace the previous teach layers. Problems are shown in the panel."""
        if self.engine is None or self._last_run is None or self._running or self.teach_task is not None:
            return
        layer = QgsProject.instance().mapLayer(self._last_run_layer_id)
        if not isinstance(layer, QgsRasterLayer):
            self._show_teach_status("The raster of the last run is no longer in the project; run again.", error=True)
            return
        if self._classes:
            examples = self.teach_tool.class_examples(self._classes)
            taught = ", ".join(dict.fromkeys(label for _, _, label in examples))
            if len({label for _, _, label in examples}) < 2:
                self._show_teach_status("Teaching several classes needs examples of at least two: click them "
                                        "first.", error=True)
                return
        else:
            examples = self.teach_tool.pixel_examples()
            taught = self._taught_class()
            if not any(is_tree for _, _, is_tree in examples):
                self._show_teach_status(f"Click at least one {taught} first.", error=True)
                return
        threshold = None if self._classes else self._wanted_threshold()
        if threshold is not None:
            QgsSettings().setValue(SETTINGS_PREFIX + "teach_threshold", threshold)
        QgsSettings().setValue(SETTINGS_PREFIX + "teach_class", self._taught_class())
        run = self._last_run
        params = replace(run, output_stem=free_output_stem(Path(run.output_dir), f"{run.output_stem}_teach"))
        self.teach_task = TeachTask(self.engine, params, examples, threshold, layer, self._teach_layer_ids,
                                    self._teach_outputs, hf_token(), class_name=taught)
        self.teach_task.progressChanged.connect(self.progress_changed)
        self.teach_task.done.connect(self._teach_finished)
        self._teach_again = False
        self.progress_changed.emit(0)
        self._show_teach_status(f"Teaching {taught}: the most probable class, unsure under 0.50…" if self._classes
                                else f"Teaching '{taught}' with threshold "
                                f"{'0.50 (automatic)' if threshold is None else f'{threshold:.2f}'}…")
        QgsApplication.taskManager().addTask(self.teach_task)
        self._update_enabled()
        self.teaching_changed.emit(True)

    def _teach_finished(self, success: bool, summary: str) -> None:
        task, self.teach_task = self.teach_task, None
        self.progress_changed.emit(100 if success else 0)
        if success:
            self._teach_layer_ids = [layer.id() for layer in task.layers]
            self._teach_outputs = list(task.record.outputs.values())
            if task.threshold is None and isinstance(task.record, TeachRecord):
                self._show_threshold(task.record.threshold)
        self._show_teach_status(summary, error=not success and summary != "Cancelled.")
        self._update_enabled()
        self.teaching_changed.emit(False)
        if self._teach_again and self._wanted_threshold() != task.threshold:
            self.teach()
        self._teach_again = False

    def _show_teach_status(self, text: str, error: bool = False) -> None:
        show_status(self.teach_status, text, error)

    def shutdown(self) -> None:
        """Cancel the teach run, remove the teach tool and its markers and the last run's scratch input (the
        plugin is unloading)."""
        self.teach_timer.stop()
        if self.teach_task is not None:
            self.teach_task.cancel()
        if self.teach_tool is not None:
            canvas = self.iface.mapCanvas()
            if canvas.mapTool() is self.teach_tool:
                canvas.unsetMapTool(self.teach_tool)
            self.teach_tool.clear()
            self.teach_tool.deleteLater()
            self.teach_tool = None
        self._keep_scratch(None)
