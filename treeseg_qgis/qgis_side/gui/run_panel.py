"""The run panel: choose a raster and the model settings, run, follow progress, cancel, see the result.

The panel holds the widgets and composes the units that do the work: `RunInput` (run_input.py: the raster, the
part of it, its VRT), `EngineProbe` (engine_probe.py: the engine and its device), `RunEstimates`
(run_estimates.py: memory and time), `RememberedSettings` (run_settings.py) and `ready_params` (run_params.py).
It builds a `treeseg_qgis.params.SegmentationParams` (every choice it offers comes from that module) and hands
it to a SegmentationTask.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsTask
from qgis.gui import QgisInterface, QgsCollapsibleGroupBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QPixmap
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QLabel,
    QLayout,
    QMessageBox,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...catalogue import BACKBONES
from ...params import (
    AUTO,
    DEFAULT_K_RANGE,
    DEVICES,
    K_MAX,
    K_MIN,
    MODEL_NAMES,
    PRECISIONS,
    STRIDES,
    ParameterError,
    SegmentationParams,
)
from ...run_record import RunRecord
from ..auth import hf_token
from ..compat import POLYGON_LAYER_FILTER, RASTER_LAYER_FILTER
from ..engine_client import EngineClient
from ..results import orthophotos, result_input_name
from .engine_probe import EngineProbe
from .layouts import button, check_box, choice_combo, fill, form_layout, hbox, line_edit, show_status
from .run_estimates import RunChoice, RunEstimates, parameters_label
from .run_input import EXTENTS, SELECTED_POLYGONS, WHOLE_LAYER, RunInput
from .run_params import DEFAULTS, InputProblem, default_output_folder, layer_file, ready_params
from .run_settings import RememberedSettings
from .task import SegmentationTask, clear_messages

DEFAULT_CLUSTERS = 5
"""The number of clusters the spin box offers until the user turns automatic K off."""
UNTRAINED_TOOLTIP = (
    "When the DINOv3 weights cannot be loaded (no Hugging Face access or token), go on with randomly "
    "initialised weights instead of stopping. The result then only checks the pipeline; it is not a "
    "segmentation, and every output is marked UNTRAINED (file names, layer group, metadata)."
)
PRECISION_TOOLTIP = (
    "What the model computes in. auto: int8 in ONNX Runtime on a CPU with AVX2 or AVX-512 (about twice as fast, "
    "features kept closely), else float32, the reference; half precision on a GPU. bfloat16 runs only when "
    "chosen; int8 runs on the CPU only."
)
ELBOW_WIDTH = 260
"""Fits the width QGIS gives a new dock (about 300 px) beside the scroll bar; the engine draws the plot for it
(engine/gis/preview.py: its points are about screen points at this width)."""
COMBO_MIN_CHARACTERS = 12
"""Combo boxes shrink to this many characters, so long layer and model names never make the panel scroll sideways."""
MODEL_COMBO_MIN_CHARACTERS = 9
"""The longest catalogue name (large-sat), leaving room for the Models… button beside it."""


def _collapsible_group(title: str, object_name: str, layout: QLayout) -> QgsCollapsibleGroupBox:
    """A group that opens and closes around `layout`; it does not remember its state between sessions."""
    group = QgsCollapsibleGroupBox(title)
    group.setObjectName(object_name)
    group.setSaveCollapsedState(False)
    group.setLayout(layout)
    return group


def _minimum_spin(maximum: float, unit: str, tooltip: str) -> QDoubleSpinBox:
    """A spin box of a minimum from 0 to `maximum` in `unit`, to one decimal, shown as "≥ value unit"."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, maximum)
    spin.setDecimals(1)
    spin.setPrefix("≥ ")
    spin.setSuffix(unit)
    spin.setToolTip(tooltip)
    return spin


class RunPanel(QWidget):
    """Input, model, stride, clusters, outputs and Advanced settings; Run and Cancel; progress and the result.

    `engine` is None when the engine environment is missing: Run is then disabled and the set-up button
    shows (`probe` holds the engine). `running_changed(bool)` tells when a run starts and ends,
    `run_succeeded(task)` hands over the finished SegmentationTask. `set_teaching(True)` keeps Run disabled
    while a teach run goes on.
    """

    running_changed = pyqtSignal(bool)
    run_succeeded = pyqtSignal(object)

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.task: SegmentationTask | None = None
        self._teaching = False
        self._build_input()
        self._build_model()
        self._build_engine_status()
        self._build_run()
        self.extras_group = self._build_extras()
        self.advanced_group = self._build_advanced()
        self._lay_out()
        self.probe = EngineProbe(engine, self.engine_label, self.setup_button)
        self.estimates = RunEstimates(self.probe)
        self.run_input = RunInput(iface, self.layer_combo, self.extent_combo, self.mask_combo)
        self._connect()
        self.run_input.follow_active_layer(iface.activeLayer())
        self.settings = self._remembered()
        self._restore_settings()
        self._update_enabled()

    def _build_input(self) -> None:
        """The raster, and which part of it: all of it, the canvas extent or the selected polygons."""
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(RASTER_LAYER_FILTER)
        self.layer_combo.setToolTip("Follows the active raster layer until you choose one here.")
        self.extent_combo = choice_combo((text, key) for key, text in EXTENTS.items())
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(POLYGON_LAYER_FILTER)
        self.mask_combo.setToolTip("The selected polygons of this layer limit the run; pixels outside are nodata.")
        self.output_widget = QgsFileWidget()
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_widget.setDialogTitle("Output folder for TreeSeg results")

    def _build_model(self) -> None:
        """The backbone (or an override), the memory it needs, the stride and the number of clusters."""
        self.model_combo = QComboBox()
        for name in MODEL_NAMES:
            model = BACKBONES[name]
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1,
                                         f"{model.label}, {parameters_label(model.params_millions)}",
                                         Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setToolTip("DINOv3 backbone; the line below gives its size and the memory a run needs. "
                                    "Greyed while a model override is set.")
        self.models_button = button("Models…", "Which models are on this computer: download, delete, the Hugging Face "
                                               "token, a local model folder")
        self.memory_label = QLabel()
        self.memory_label.setWordWrap(True)
        self.model_override = line_edit(placeholder="optional: Hugging Face id or model folder",
                                        tooltip="Overrides the model above with any DINOv3 ViT: a Hugging Face id "
                                                "(owner/name) or a local folder in Hugging Face format. The line "
                                                "below names the model that runs.")
        self.stride_combo = choice_combo(((f"{stride} px", stride) for stride in STRIDES),
                                         "Stride 8 costs 4 × the time of 16; stride 4 costs 16 ×.")
        self.auto_clusters = check_box("Automatic", "Pick the number of clusters from the elbow of the k-means inertia "
                                                    f"({DEFAULT_K_RANGE[0]}–{DEFAULT_K_RANGE[1]}).")
        self.clusters_spin = QSpinBox()
        self.clusters_spin.setRange(K_MIN, K_MAX)

    def _build_engine_status(self) -> None:
        self.engine_label = QLabel()
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setup_button = button("Set up the engine…",
                                   "Install the engine (torch, transformers) in a Python environment of its own")

    def _build_run(self) -> None:
        """Run, Cancel, the progress, the stage and the elbow plot of automatic K."""
        self.allow_untrained = check_box("Allow untrained weights", UNTRAINED_TOOLTIP)
        self.run_button = button("Run", clicked=self.run)
        self.cancel_button = button("Cancel", clicked=self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.stage_label = QLabel()
        self.stage_label.setWordWrap(True)
        self.elbow_caption = QLabel()
        self.elbow_caption.setWordWrap(True)
        self.elbow_image = QLabel()
        self.elbow_image.setAlignment(Qt.AlignmentFlag.AlignCenter)

    def _build_extras(self) -> QgsCollapsibleGroupBox:
        """The 'More outputs' group: crowns, feature image, canopy height."""
        self.crowns_check = check_box("Tree crowns", "One polygon per tree crown (watershed of the tree mask from the "
                                      "crown centres), with area, perimeter, diameter and centroid.")
        self.crown_min_area = _minimum_spin(1000.0, " m²", "Minimum crown area: crowns smaller than this are dropped.")
        self.features_check = check_box("Feature image", "The first three principal components of the DINOv3 features "
                                        "as an RGB image: what the model tells apart.")
        self.height_check = check_box("Canopy height", "Metres per pixel from the DINOv3 canopy-height head "
                                      f"({DEFAULTS.height_model}, gated like the backbones).")
        self.min_height_spin = _minimum_spin(100.0, " m", "Minimum tree height: tree pixels lower than this are "
                                             "dropped, which separates trees from grass and shrubs of the same colour.")
        self.min_height_spin.setSingleStep(0.5)
        self.min_height_spin.setSpecialValueText("any height")
        self.height_model_override = line_edit(
            placeholder="optional: canopy-height model id or folder",
            tooltip=f"Overrides {DEFAULTS.height_model} with another CHMv2 model: a Hugging Face id or a local "
                    "folder in Hugging Face format.")
        form = form_layout(
            (self.crowns_check, self.crown_min_area),
            self.features_check,
            (self.height_check, self.min_height_spin),
            ("Height model", self.height_model_override),
        )
        return _collapsible_group("More outputs", "TreesegMoreOutputs", form)

    def _build_advanced(self) -> QgsCollapsibleGroupBox:
        """The 'Advanced' group: where the model runs, in which precision (auto suits most runs), and a
        survey's saved cluster model."""
        self.device_combo = choice_combo(((device, device) for device in DEVICES),
                                         "auto takes a GPU when the engine finds one, else the CPU.")
        self.precision_combo = choice_combo(((precision, precision) for precision in PRECISIONS), PRECISION_TOOLTIP)
        self.cluster_model_widget = QgsFileWidget()
        self.cluster_model_widget.setFilter("TreeSeg cluster model (*.treeseg)")
        self.cluster_model_widget.setToolTip("Optional: a survey's cluster model (python -m treeseg_qgis fit, or "
                                             "Processing ▸ Surveys). Its clusters are applied as they are, so this "
                                             "raster gets the survey's cluster ids and legend; Clusters is ignored.")
        form = form_layout(
            ("Device", self.device_combo),
            ("Precision", self.precision_combo),
            ("Cluster model", self.cluster_model_widget),
        )
        return _collapsible_group("Advanced", "TreesegAdvanced", form)

    def _lay_out(self) -> None:
        for combo in (self.layer_combo, self.extent_combo, self.mask_combo, self.model_combo, self.stride_combo,
                      self.device_combo, self.precision_combo):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(COMBO_MIN_CHARACTERS)
        self.model_combo.setMinimumContentsLength(MODEL_COMBO_MIN_CHARACTERS)
        self._form = form_layout(
            ("Raster layer", self.layer_combo),
            ("Extent", self.extent_combo),
            ("Polygon layer", self.mask_combo),
            ("Model", hbox((self.model_combo, 1), self.models_button)),
            ("Model override", self.model_override),
            ("Stride", self.stride_combo),
            ("Clusters", hbox(self.auto_clusters, (self.clusters_spin, 1))),
            self.memory_label,
            self.engine_label,
            self.setup_button,
            ("Output folder", self.output_widget),
            self.allow_untrained,
        )
        panel = fill(QVBoxLayout(self), self._form, self.extras_group, self.advanced_group,
                     hbox(self.run_button, self.cancel_button), self.progress_bar, self.stage_label,
                     self.elbow_caption, self.elbow_image)
        panel.setContentsMargins(0, 0, 0, 0)

    def _connect(self) -> None:
        for changed in (self.extent_combo.currentIndexChanged, self.auto_clusters.toggled, self.crowns_check.toggled,
                        self.height_check.toggled):
            changed.connect(self._update_enabled)
        self.probe.probed.connect(self._engine_probed)
        for changed in (self.extent_combo.currentIndexChanged, self.layer_combo.layerChanged,
                        self.model_combo.currentIndexChanged, self.model_override.textChanged,
                        self.stride_combo.currentIndexChanged, self.device_combo.currentTextChanged):
            changed.connect(self._show_memory_estimate)

    def _remembered(self) -> RememberedSettings:
        """The settings kept between sessions: the widget of each remembered parameter, and the panel's own
        choices."""
        parameters = {"output_dir": self.output_widget, "model": self.model_combo, "stride": self.stride_combo,
                      "clusters": self.clusters_spin, "device": self.device_combo, "precision": self.precision_combo,
                      "crowns": self.crowns_check, "feature_preview": self.features_check,
                      "canopy_height": self.height_check, "min_tree_height_m": self.min_height_spin,
                      "crown_min_area_m2": self.crown_min_area}
        shown_defaults = {"output_dir": default_output_folder(), "clusters": DEFAULT_CLUSTERS, "min_tree_height_m": 0.0}
        return RememberedSettings(parameters, shown_defaults, {
            "model_override": (self.model_override, ""),
            "auto_clusters": (self.auto_clusters, DEFAULTS.clusters == AUTO),
            "extent": (self.extent_combo, WHOLE_LAYER),
            "height_model_override": (self.height_model_override, ""),
        })

    def _restore_settings(self) -> None:
        """The last run's settings (the defaults before any); groups open where they hold a choice."""
        self.settings.restore()
        self.extras_group.setCollapsed(not any(check.isChecked() for check in (
            self.crowns_check, self.features_check, self.height_check)))
        self.advanced_group.setCollapsed(self.device_combo.currentData() == DEFAULTS.device
                                         and self.precision_combo.currentData() == DEFAULTS.precision)

    def _update_enabled(self) -> None:
        running = self.task is not None
        self.run_button.setEnabled(self.probe.engine is not None and self.probe.usable and not running
                                   and not self._teaching)
        self.cancel_button.setEnabled(running)
        self.clusters_spin.setEnabled(not self.auto_clusters.isChecked())
        self.crown_min_area.setEnabled(self.crowns_check.isChecked())
        self.min_height_spin.setEnabled(self.height_check.isChecked())
        self.height_model_override.setEnabled(self.height_check.isChecked())
        polygons = self.extent_combo.currentData() == SELECTED_POLYGONS
        self.mask_combo.setVisible(polygons)
        self._form.labelForField(self.mask_combo).setVisible(polygons)

    def set_teaching(self, teaching: bool) -> None:
        """A teach run is going on (Run waits for it) or has ended."""
        self._teaching = teaching
        self._update_enabled()

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Start the engine (and learn its device) the first time the panel is shown."""
        super().showEvent(event)
        self.probe.start()

    def _engine_probed(self) -> None:
        """The engine answered (or failed): Run and the estimate follow, a run waiting for it starts."""
        self._update_enabled()
        self._show_memory_estimate()
        if self.task is not None and self.task.status() == QgsTask.TaskStatus.OnHold:
            self.task.unhold()

    def set_engine(self, engine: EngineClient | None) -> None:
        """Use `engine` from now on (the set-up dialog made or removed one): probed at once when the panel
        is open, else when it is next shown."""
        self.probe.set_engine(engine, start=self.isVisible())
        self._update_enabled()

    def model_in_use(self) -> str:
        """The model a run uses: the override when one is set, else the chosen catalogue model."""
        return self.model_override.text().strip() or self.model_combo.currentData()

    def choice(self) -> RunChoice:
        """The panel's choices the estimates depend on."""
        return RunChoice(self.model_in_use(), self.stride_combo.currentData(), self.device_combo.currentData(),
                         self.precision_combo.currentData(), self.auto_clusters.isChecked(),
                         self.run_input.whole_layer_size())

    def _show_memory_estimate(self) -> None:
        """The model that runs (named when an override sets it; the Model box is then greyed), its size and the
        memory the run needs: the one estimate the panel and Models… show."""
        override = self.model_override.text().strip()
        self.model_combo.setEnabled(not override)
        text, will_not_fit = self.estimates.describe(self.choice(), bool(override))
        show_status(self.memory_label, text, will_not_fit)
        self.memory_label.setToolTip(override)

    def _input_not_a_result(self) -> bool:
        """True when the chosen layer is an orthophoto, or the user chose to run on its orthophoto (then chosen) or
        on the result anyway; a TreeSeg result raster (clusters, a mask) is not what a run should segment."""
        layer = self.layer_combo.currentLayer()
        input_name = result_input_name(layer, QgsProject.instance()) if layer is not None else None
        if input_name is None:
            return True
        found = orthophotos(QgsProject.instance(), input_name)
        if not found:
            return self._run_anyway(f"'{layer.name()}' is a TreeSeg result of '{input_name}', not an orthophoto: "
                                    "a run on it segments its colours.")
        answer = QMessageBox.question(
            self, "TreeSeg", f"'{layer.name()}' is a TreeSeg result of '{input_name}', not an orthophoto. Run on "
            f"'{input_name}' instead?", QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.Yes)
        if answer != QMessageBox.StandardButton.Yes:
            self.show_stage(f"'{layer.name()}' is a TreeSeg result: choose the orthophoto to segment.", error=True)
            return False
        self.layer_combo.setLayer(found[0])
        return True

    def build_params(self, input_path: str | None = None) -> SegmentationParams:
        """The run's parameters from the panel, validated, with an output stem that overwrites no earlier run;
        `input_path` defaults to the layer's file. Raises InputProblem or ParameterError when the panel cannot
        make a run."""
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise InputProblem("Choose a raster layer (an orthophoto) first.")
        source = layer_file(layer)
        heights = self.height_check.isChecked()
        return ready_params(SegmentationParams(
            input_path=input_path or source,
            output_dir=self.output_widget.filePath().strip(),
            model=self.model_in_use(),
            stride=self.stride_combo.currentData(),
            clusters=AUTO if self.auto_clusters.isChecked() else self.clusters_spin.value(),
            device=self.device_combo.currentData(),
            precision=self.precision_combo.currentData(),
            allow_untrained=self.allow_untrained.isChecked(),
            crowns=self.crowns_check.isChecked(),
            crown_min_area_m2=self.crown_min_area.value(),
            feature_preview=self.features_check.isChecked(),
            canopy_height=heights,
            min_tree_height_m=(self.min_height_spin.value() or None) if heights else None,
            height_model=self.height_model_override.text().strip() or DEFAULTS.height_model,
            cluster_model=self.cluster_model_widget.filePath().strip() or None,
        ), source)

    def run(self) -> None:
        """Start a run with the panel's settings; problems are shown in the panel, nothing starts."""
        engine = self.probe.engine
        if engine is None or self.task is not None or self._teaching:
            return
        if not self._input_not_a_result():
            return
        choice = self.choice()  # after the question above, which may choose the result's orthophoto
        if not self._run_anyway(self.estimates.memory_problem(choice), self.estimates.size_problem(choice)):
            return
        scratch = None if self.run_input.whole_layer else Path(tempfile.mkdtemp(prefix="treeseg-input-"))
        try:
            params = self.build_params(self.run_input.vrt(scratch) if scratch else None)
        except (InputProblem, ParameterError) as problem:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            self.show_stage(str(problem), error=True)
            return
        self.settings.save()
        self.estimates.run_started(self.choice())
        clear_messages(self.iface.messageBar())
        self.task = SegmentationTask(engine, params, self.layer_combo.currentLayer(), self.iface.messageBar(),
                                     scratch, hf_token())
        self.task.stage_changed.connect(self.show_stage)
        self.task.progressChanged.connect(self.show_progress)
        self.task.done.connect(self._finished)
        self.progress_bar.setValue(0)
        if self.elbow_image.isVisible():  # kept until this run's result, so Cancel stays where it was
            self.elbow_caption.setText(f"Last run: {self.elbow_caption.text()}")
        if self.probe.waiting:
            self.task.hold()
            self.show_stage("Waiting for the engine to start…")
        else:
            self.show_stage("Starting…")
        QgsApplication.taskManager().addTask(self.task)
        self._update_enabled()
        self.running_changed.emit(True)

    def _run_anyway(self, *problems: str | None) -> bool:
        """True when there is no warning, or the user still wants the run after reading it."""
        problem = "\n\n".join(filter(None, problems))
        if not problem:
            return True
        answer = QMessageBox.question(self, "TreeSeg", f"{problem}\n\nRun anyway?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        if answer == QMessageBox.StandardButton.Yes:
            return True
        self.show_stage(problem, error=True)
        return False

    def cancel(self) -> None:
        """Stop the running task; the engine removes what it had written."""
        if self.task is not None:
            self.show_stage("Cancelling…")
            self.task.cancel()

    def shutdown(self) -> None:
        """Cancel the run and the probe, stop following the active layer (the plugin is unloading)."""
        self.cancel()
        self.run_input.shutdown()
        self.probe.stop()

    def show_progress(self, percent: float) -> None:
        """The progress bar at `percent` (of a run, or of a teach run)."""
        self.progress_bar.setValue(int(percent))

    def show_stage(self, text: str, error: bool = False) -> None:
        """The line under the progress bar: the engine's stage, the result or what went wrong."""
        show_status(self.stage_label, text, error)

    def _finished(self, success: bool, summary: str) -> None:
        task, self.task = self.task, None
        self.progress_bar.setValue(100 if success else 0)
        self._show_elbow(task.record if success else None)
        if success:
            self.estimates.learn_from(task.record, self.choice())
            self._show_memory_estimate()
            self.run_succeeded.emit(task)
        self.show_stage(f"Done: {summary}" if success else summary, error=not success and summary != "Cancelled.")
        self._update_enabled()
        self.running_changed.emit(False)

    def _show_elbow(self, record: RunRecord | None) -> None:
        """The elbow plot of a run with automatic K, with the K it chose; hidden otherwise."""
        elbow = record.outputs.get("elbow") if record is not None else None
        pixmap = QPixmap(elbow) if elbow else QPixmap()
        if record is not None and not pixmap.isNull():
            self.elbow_caption.setText(f"Automatic K = {record.clusters.k}: the elbow of the k-means inertia "
                                       "curve.")
            ratio = self.elbow_image.devicePixelRatioF()
            shown = pixmap.scaledToWidth(round(ELBOW_WIDTH * ratio), Qt.TransformationMode.SmoothTransformation)
            shown.setDevicePixelRatio(ratio)
            self.elbow_image.setPixmap(shown)
            self.elbow_image.setToolTip(elbow)
        self.elbow_caption.setVisible(not pixmap.isNull())
        self.elbow_image.setVisible(not pixmap.isNull())
