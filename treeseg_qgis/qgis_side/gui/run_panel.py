"""The run panel: choose a raster and the model settings, run, follow progress, cancel, see the result.

The panel builds a `treeseg_qgis.params.SegmentationParams` (every choice it offers comes from that
module), validates it and hands it to a SegmentationTask. A canvas extent or a polygon selection becomes
a small GDAL VRT in the raster's CRS, made here on the main thread before the task starts. The first
time the panel is shown it starts the engine, which tells the device a run would use; the panel shows
it with the memory the run needs.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsSettings,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import QgisInterface, QgsCollapsibleGroupBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QPixmap
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...catalogue import BACKBONES
from ...memory import (
    RUN_BATCH_SIZE,
    RUN_TILE_SIZE,
    available_memory_bytes,
    estimate_peak_bytes,
    estimate_run_time,
    format_gigabytes,
    memory_warning,
    model_entry,
    size_warning,
    speed_factor,
    tiles_and_time,
)
from ...outputs import OutputPathError, OutputPaths, check_run_paths
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
    remembered_names,
)
from ...run_record import RunRecord
from ..auth import hf_token
from ..compat import POLYGON_LAYER_FILTER, RASTER_LAYER_FILTER
from ..engine_client import EngineClient, missing_engine_message
from ..raster_input import prepare_input
from ..results import orthophotos, result_input_name
from .layouts import button, check_box, fill, hbox
from .task import ProbeTask, SegmentationTask, clear_messages

DEFAULTS = SegmentationParams(input_path="", output_dir="")
"""What a run uses for everything the panel leaves at its default."""
WHOLE_LAYER, CANVAS_EXTENT, SELECTED_POLYGONS = "layer", "canvas", "selection"
EXTENTS = {
    WHOLE_LAYER: "Whole layer",
    CANVAS_EXTENT: "Current map canvas extent",
    SELECTED_POLYGONS: "Selected polygons of a layer",
}
SETTINGS_PREFIX = "treeseg/dock/"
SPEED_SETTING = SETTINGS_PREFIX + "measured_over_estimated"
"""The last runs' measured seconds over their estimates (JSON list): this machine's speed for the next estimate."""
EXPORTED_SETTING = SETTINGS_PREFIX + "int8_exported_models"
"""The models whose int8 export the engine has made and cached (JSON list)."""
SPEED_RUNS_KEPT = 3
UNESTIMATED_STEPS = ("canopy_height", "crowns")
"""Run-record timings of the optional steps the time estimate does not count."""
DEFAULT_CLUSTERS = 5
"""The number of clusters the spin box offers until the user turns automatic K off."""
EXPORT_HINT = ("export it to a GeoTIFF first (right-click the layer ▸ Export ▸ Save As…) and run TreeSeg "
               "on that file")
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
ERROR_STYLE = "color: #b00020;"
ELBOW_WIDTH = 260
"""Fits the width QGIS gives a new dock (about 300 px) beside the scroll bar; the engine draws the plot for it
(engine/gis/preview.py: its points are about screen points at this width)."""
COMBO_MIN_CHARACTERS = 12
"""Combo boxes shrink to this many characters, so long layer and model names never make the panel scroll sideways."""
MODEL_COMBO_MIN_CHARACTERS = 9
"""The longest catalogue name (large-sat), leaving room for the Models… button beside it."""


class InputProblem(ValueError):
    """The panel's settings cannot make a run; the message tells the user what to change."""


def parameters_label(millions: float) -> str:
    """E.g. '86 M parameters', '6.7 B parameters'."""
    if millions >= 1000:
        return f"{millions / 1000:.1f} B parameters"
    return f"{millions:.0f} M parameters" if millions >= 10 else f"{millions:.1f} M parameters"


def layer_file(layer: QgsRasterLayer) -> str:
    """The GDAL source of a raster stored in a local file; InputProblem for web and database layers."""
    if layer.providerType() != "gdal":
        where = f"its data come from the '{layer.providerType()}' provider"
    elif not Path(QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path") or "").is_file():
        where = f"{layer.source()} is not a local file"
    else:
        return layer.source()
    raise InputProblem(f"'{layer.name()}' cannot be read by TreeSeg ({where}): {EXPORT_HINT}.")


def free_output_stem(folder: Path, stem: str) -> str:
    """`stem`, or `stem_2`, `stem_3`… so that a run never overwrites the outputs of an earlier one."""
    candidate, number = stem, 1
    while any(path.exists() for untrained in (False, True) for path in OutputPaths.for_params(
            SegmentationParams("", str(folder), output_stem=candidate), untrained).all()):
        number += 1
        candidate = f"{stem}_{number}"
    return candidate


def default_output_folder() -> str:
    """A 'treeseg' folder in the project's home, or in the system's temporary folder."""
    home = QgsProject.instance().homePath()
    return str(Path(home or tempfile.gettempdir()) / "treeseg")


def _collapsible_group(title: str, object_name: str, layout: QLayout) -> QgsCollapsibleGroupBox:
    """A group of the panel that opens and closes; it does not remember its state between sessions."""
    group = QgsCollapsibleGroupBox(title)
    group.setObjectName(object_name)
    group.setSaveCollapsedState(False)
    group.setLayout(layout)
    return group


def show_status(label: QLabel, text: str, error: bool = False) -> None:
    """`text` in `label`, in red for an error."""
    label.setText(text)
    label.setStyleSheet(ERROR_STYLE if error else "")


def _form_layout() -> QFormLayout:
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    return form


def _choice_combo(choices: Iterable[tuple[str, Any]], tooltip: str = "") -> QComboBox:
    """A combo box of (text, item data) choices."""
    combo = QComboBox()
    for text, data in choices:
        combo.addItem(text, data)
    combo.setToolTip(tooltip)
    return combo


def _minimum_spin(maximum: float, unit: str, tooltip: str) -> QDoubleSpinBox:
    """A spin box of a minimum from 0 to `maximum` in `unit`, to one decimal, shown as "≥ value unit"."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, maximum)
    spin.setDecimals(1)
    spin.setPrefix("≥ ")
    spin.setSuffix(unit)
    spin.setToolTip(tooltip)
    return spin


def _value_of(widget: QWidget) -> Any:
    """What a settings widget shows: a combo box's item data, a check, a number, a text or a path."""
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        return widget.value()
    if isinstance(widget, QLineEdit):
        return widget.text().strip()
    return widget.filePath()


def _show_value(widget: QWidget, value: Any) -> None:
    """Put `value` in a settings widget; a combo box keeps its choice when no item has that data."""
    if isinstance(widget, QComboBox):
        index = widget.findData(value)
        if index >= 0:
            widget.setCurrentIndex(index)
    elif isinstance(widget, QCheckBox):
        widget.setChecked(value)
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QLineEdit):
        widget.setText(value)
    else:
        widget.setFilePath(value)


class RunPanel(QWidget):
    """Input, model, stride, clusters, outputs and Advanced settings; Run and Cancel; progress and the result.

    `engine` is None when the engine environment is missing: Run is then disabled and the set-up button
    shows. `running_changed(bool)` tells when a run starts and ends, `run_succeeded(task)` hands over the
    finished SegmentationTask. `set_teaching(True)` keeps Run disabled while a teach run goes on.
    """

    running_changed = pyqtSignal(bool)
    run_succeeded = pyqtSignal(object)

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.engine = engine
        self.task: SegmentationTask | None = None
        self._teaching = False
        self._probe: ProbeTask | None = None
        self._engine_info: dict[str, Any] | None = None
        self._probe_started = False
        self._engine_unusable = False
        self._layer_chosen = False
        self._loaded_model: tuple[str, str, str] | None = None
        self._run_timing: tuple[float, dict[str, Any]] | None = None
        self._build_input()
        self._build_model()
        self._build_engine_status()
        self._build_run()
        self.extras_group = self._build_extras()
        self.advanced_group = self._build_advanced()
        self._lay_out()
        self._connect()
        self.follow_active_layer(self.iface.activeLayer())
        self._restore_settings()
        self._show_engine_presence()
        self._update_enabled()

    def _build_input(self) -> None:
        """The raster, and which part of it: all of it, the canvas extent or the selected polygons."""
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(RASTER_LAYER_FILTER)
        self.layer_combo.setToolTip("Follows the active raster layer until you choose one here.")
        self.extent_combo = _choice_combo((text, key) for key, text in EXTENTS.items())
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
        self.model_override = QLineEdit()
        self.model_override.setPlaceholderText("optional: Hugging Face id or model folder")
        self.model_override.setToolTip("Overrides the model above with any DINOv3 ViT: a Hugging Face id "
                                       "(owner/name) or a local folder in Hugging Face format. The line below "
                                       "names the model that runs.")
        self.stride_combo = _choice_combo(((f"{stride} px", stride) for stride in STRIDES),
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
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
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
        self.height_model_override = QLineEdit()
        self.height_model_override.setPlaceholderText("optional: canopy-height model id or folder")
        self.height_model_override.setToolTip(f"Overrides {DEFAULTS.height_model} with another CHMv2 model: a "
                                              "Hugging Face id or a local folder in Hugging Face format.")
        form = _form_layout()
        form.addRow(self.crowns_check, self.crown_min_area)
        form.addRow(self.features_check)
        form.addRow(self.height_check, self.min_height_spin)
        form.addRow("Height model", self.height_model_override)
        return _collapsible_group("More outputs", "TreesegMoreOutputs", form)

    def _build_advanced(self) -> QgsCollapsibleGroupBox:
        """The 'Advanced' group: where the model runs, in which precision (auto suits most runs), and a
        survey's saved cluster model."""
        self.device_combo = _choice_combo(((device, device) for device in DEVICES),
                                          "auto takes a GPU when the engine finds one, else the CPU.")
        self.precision_combo = _choice_combo(((precision, precision) for precision in PRECISIONS), PRECISION_TOOLTIP)
        self.cluster_model_widget = QgsFileWidget()
        self.cluster_model_widget.setFilter("TreeSeg cluster model (*.treeseg)")
        self.cluster_model_widget.setToolTip("Optional: a survey's cluster model (python -m treeseg_qgis fit, or "
                                             "Processing ▸ Surveys). Its clusters are applied as they are, so this "
                                             "raster gets the survey's cluster ids and legend; Clusters is ignored.")
        form = _form_layout()
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow("Cluster model", self.cluster_model_widget)
        return _collapsible_group("Advanced", "TreesegAdvanced", form)

    def _lay_out(self) -> None:
        for combo in (self.layer_combo, self.extent_combo, self.mask_combo, self.model_combo, self.stride_combo,
                      self.device_combo, self.precision_combo):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(COMBO_MIN_CHARACTERS)
        self.model_combo.setMinimumContentsLength(MODEL_COMBO_MIN_CHARACTERS)
        form = _form_layout()
        form.addRow("Raster layer", self.layer_combo)
        form.addRow("Extent", self.extent_combo)
        form.addRow("Polygon layer", self.mask_combo)
        form.addRow("Model", hbox((self.model_combo, 1), self.models_button))
        form.addRow("Model override", self.model_override)
        form.addRow("Stride", self.stride_combo)
        form.addRow("Clusters", hbox(self.auto_clusters, (self.clusters_spin, 1)))
        form.addRow(self.memory_label)
        form.addRow(self.engine_label)
        form.addRow(self.setup_button)
        form.addRow("Output folder", self.output_widget)
        form.addRow(self.allow_untrained)
        self._form = form
        panel = fill(QVBoxLayout(self), form, self.extras_group, self.advanced_group,
                     hbox(self.run_button, self.cancel_button), self.progress_bar, self.stage_label,
                     self.elbow_caption, self.elbow_image)
        panel.setContentsMargins(0, 0, 0, 0)

    def _connect(self) -> None:
        self.extent_combo.currentIndexChanged.connect(self._update_enabled)
        self.auto_clusters.toggled.connect(self._update_enabled)
        self.crowns_check.toggled.connect(self._update_enabled)
        self.height_check.toggled.connect(self._update_enabled)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.layer_combo.activated.connect(self._layer_picked)
        self.iface.currentLayerChanged.connect(self.follow_active_layer)
        for changed in (self.extent_combo.currentIndexChanged, self.layer_combo.layerChanged,
                        self.model_combo.currentIndexChanged, self.model_override.textChanged,
                        self.stride_combo.currentIndexChanged, self.device_combo.currentTextChanged):
            changed.connect(self._show_memory_estimate)

    def _remembered(self) -> dict[str, tuple[QWidget, Any]]:
        """The settings kept between sessions: key under SETTINGS_PREFIX → (widget, value before any run): each
        parameter that declares itself remembered (params.remembered_names), and the panel's own choices."""
        widgets = {"output_dir": self.output_widget, "model": self.model_combo, "stride": self.stride_combo,
                   "clusters": self.clusters_spin, "device": self.device_combo, "precision": self.precision_combo,
                   "crowns": self.crowns_check, "feature_preview": self.features_check,
                   "canopy_height": self.height_check, "min_tree_height_m": self.min_height_spin,
                   "crown_min_area_m2": self.crown_min_area}
        shown_defaults = {"output_dir": default_output_folder(), "clusters": DEFAULT_CLUSTERS, "min_tree_height_m": 0.0}
        return {
            **{name: (widgets[name], shown_defaults.get(name, getattr(DEFAULTS, name))) for name in remembered_names()},
            "model_override": (self.model_override, ""),
            "auto_clusters": (self.auto_clusters, DEFAULTS.clusters == AUTO),
            "extent": (self.extent_combo, WHOLE_LAYER),
            "height_model_override": (self.height_model_override, ""),
        }

    def _restore_settings(self) -> None:
        """The last run's settings (the defaults before any); groups open where they hold a choice."""
        settings = QgsSettings()
        for key, (widget, default) in self._remembered().items():
            _show_value(widget, settings.value(SETTINGS_PREFIX + key, default, type=type(default)))
        self.extras_group.setCollapsed(not any(check.isChecked() for check in (
            self.crowns_check, self.features_check, self.height_check)))
        self.advanced_group.setCollapsed(self.device_combo.currentData() == DEFAULTS.device
                                         and self.precision_combo.currentData() == DEFAULTS.precision)

    def _save_settings(self) -> None:
        settings = QgsSettings()
        for key, (widget, _) in self._remembered().items():
            settings.setValue(SETTINGS_PREFIX + key, _value_of(widget))

    def _update_enabled(self) -> None:
        running = self.task is not None
        self.run_button.setEnabled(self.engine is not None and not self._engine_unusable and not running
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
        if self.engine is not None and not self._probe_started:
            self._start_probe()

    def _start_probe(self) -> None:
        self._probe_started = True
        self.engine_label.setText("Engine: starting…")
        self._probe = ProbeTask(self.engine)
        self._probe.probed.connect(self._show_engine)
        QgsApplication.taskManager().addTask(self._probe)

    def _show_engine(self, description: str, ok: bool) -> None:
        self._engine_info = self._probe.info if self._probe is not None and ok else None
        self._probe = None
        self._engine_unusable = not ok
        self._update_enabled()
        self._show_memory_estimate()
        if ok:
            show_status(self.engine_label, f"Engine: {description}")
        else:
            error = html.escape(description).replace("\n", "<br>")
            show_status(self.engine_label, f"<b>Engine not usable.</b> {error}", error=True)
        self.setup_button.setVisible(not ok)
        if self.task is not None and self.task.status() == QgsTask.TaskStatus.OnHold:
            self.task.unhold()

    def set_engine(self, engine: EngineClient | None) -> None:
        """Use `engine` from now on (the set-up dialog made or removed one): probed at once when the panel
        is open, else when it is next shown."""
        self._stop_probe()
        self.engine = engine
        self._probe_started = False
        self._engine_unusable = False
        self._show_engine_presence()
        self._update_enabled()
        if engine is not None and self.isVisible():
            self._start_probe()

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.probed.disconnect(self._show_engine)
            self._probe = None

    def _show_engine_presence(self) -> None:
        """The engine label before the probe; the set-up button while there is no engine (the probe shows
        it for an unusable one too)."""
        if self.engine is None:
            show_status(self.engine_label, f"<b>Engine missing.</b> {missing_engine_message()}", error=True)
        else:
            show_status(self.engine_label, "Engine: starts when the panel opens…")
        self.setup_button.setVisible(self.engine is None)

    def _run_device(self) -> str:
        """cpu, cuda or mps: the device chosen, or for auto the one the engine's probe found (cpu before)."""
        chosen = self.device_combo.currentData()
        if chosen != AUTO:
            return chosen
        return str((self._engine_info or {}).get("device", "cpu")).split(":")[0]

    def model_in_use(self) -> str:
        """The model a run uses: the override when one is set, else the chosen catalogue model."""
        return self.model_override.text().strip() or self.model_combo.currentData()

    def _memory_needed_and_free(self) -> tuple[int | None, int | None, str]:
        """(bytes the run needs, bytes free where it runs, the device) for the model, stride and device."""
        device = self._run_device()
        needed = estimate_peak_bytes(self.model_in_use(), self.stride_combo.currentData(), RUN_TILE_SIZE,
                                     RUN_BATCH_SIZE, device)
        free = available_memory_bytes() if device == "cpu" else (self._engine_info or {}).get("memory_available_bytes")
        return needed, free, device

    def memory_problem(self) -> str | None:
        """The warning when the run will not fit the memory of its device; None when it fits or cannot be told."""
        needed, free, device = self._memory_needed_and_free()
        return memory_warning(self.model_in_use(), self.stride_combo.currentData(), RUN_TILE_SIZE, RUN_BATCH_SIZE,
                              free, device)

    def _whole_layer_size(self) -> tuple[int, int] | None:
        """(width, height) in pixels of the chosen raster when the run covers all of it; None otherwise."""
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or self.extent_combo.currentData() != WHOLE_LAYER:
            return None
        return layer.width(), layer.height()

    def size_problem(self) -> str | None:
        """The warning when the run over the whole layer is expected to take very long; None otherwise."""
        size = self._whole_layer_size()
        if size is None:
            return None
        return size_warning(self.model_in_use(), *size, self.stride_combo.currentData(), RUN_TILE_SIZE,
                            self._run_device(), **self._estimate_options(), speed=self._speed())

    def _model_key(self) -> tuple[str, str, str]:
        return self.model_in_use(), self.device_combo.currentData(), self.precision_combo.currentData()

    def _run_precision(self) -> str:
        """The precision the run computes in: the one chosen, or for auto what the engine's probe said (int8 on
        a CPU with fast int8, before the probe too)."""
        chosen = self.precision_combo.currentData()
        return chosen if chosen != AUTO else str((self._engine_info or {}).get("precision", "int8"))

    def _estimate_options(self) -> dict[str, Any]:
        """What the time estimate needs besides the raster: the precision, automatic K, and what is still to come
        before the first tile (the engine start, the model load, the first int8 export)."""
        started = self.engine is not None and self.engine.running
        exported = json.loads(QgsSettings().value(EXPORTED_SETTING, "[]", type=str) or "[]")
        return {"precision": self._run_precision(), "automatic_k": self.auto_clusters.isChecked(),
                "engine_started": started, "model_loaded": started and self._loaded_model == self._model_key(),
                "exported": self.model_in_use() in exported}

    @staticmethod
    def _speed() -> float:
        """This machine's measured speed against the estimates of its last runs (1 before any)."""
        return speed_factor(json.loads(QgsSettings().value(SPEED_SETTING, "[]", type=str) or "[]"))

    def _learn_from(self, record: RunRecord) -> None:
        """After a run: keep its measured time over its estimate for the next estimates, and what it loaded."""
        started, options = self._run_timing or (None, {})
        self._loaded_model = self._model_key()
        if (record.model.precision or "").startswith("int8"):
            settings = QgsSettings()
            exported = json.loads(settings.value(EXPORTED_SETTING, "[]", type=str) or "[]")
            settings.setValue(EXPORTED_SETTING, json.dumps(sorted({*exported, self.model_in_use()})))
        ran = record.parameters
        expected = estimate_run_time(ran.model, record.input.width, record.input.height, record.stride,
                                     ran.tile_size, self._run_device(), ran.overlap, **options)
        if started is None or expected is None or record.feature_cache.state == "hit":
            return
        # Steps the estimate leaves out (the canopy-height head, crowns) must not be learnt as slowness.
        unestimated = sum(record.timings.get(step, 0.0) for step in UNESTIMATED_STEPS)
        measured = json.loads(QgsSettings().value(SPEED_SETTING, "[]", type=str) or "[]")
        measured = [*measured, max(time.monotonic() - started - unestimated, 0.0) / expected.total][-SPEED_RUNS_KEPT:]
        QgsSettings().setValue(SPEED_SETTING, json.dumps(measured))

    def _show_memory_estimate(self) -> None:
        """The model that runs (named when an override sets it; the Model box is then greyed), its size and the
        memory the run needs: the one estimate the panel and Models… show."""
        override = self.model_override.text().strip()
        self.model_combo.setEnabled(not override)
        entry = model_entry(self.model_in_use())
        needed, free, device = self._memory_needed_and_free()
        name = entry.name if entry is not None else override
        model = f"Runs <b>{name}</b> (model override)" if override else f"<b>{name}</b>"
        if entry is not None:
            model += f", {parameters_label(entry.params_millions)}"
        if needed is None:
            memory = "memory needed unknown until it loads"
        else:
            where = "this computer" if device == "cpu" else f"the {device.upper()} device"
            memory = f"needs about {format_gigabytes(needed)} of memory"
            memory += f"; {format_gigabytes(free)} free on {where}" if free is not None else ""
        size = self._whole_layer_size()
        if size is not None:
            memory += ". The layer: " + tiles_and_time(self.model_in_use(), *size, self.stride_combo.currentData(),
                                                       RUN_TILE_SIZE, device, **self._estimate_options(),
                                                       speed=self._speed())
        self.memory_label.setText(f"{model}: {memory}.")
        self.memory_label.setToolTip(override)
        will_not_fit = needed is not None and free is not None and needed > free
        self.memory_label.setStyleSheet(ERROR_STYLE if will_not_fit else "")

    def follow_active_layer(self, layer: QgsMapLayer | None) -> None:
        """Show `layer` (the active layer of QGIS) when it is a raster, not a TreeSeg result, and no layer was
        picked in the panel."""
        if (not self._layer_chosen and isinstance(layer, QgsRasterLayer)
                and result_input_name(layer, QgsProject.instance()) is None):
            self.layer_combo.setLayer(layer)

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

    def _layer_picked(self) -> None:
        """The user chose a layer in the panel: it stays until they choose another."""
        self._layer_chosen = True

    def build_params(self, input_path: str | None = None) -> SegmentationParams:
        """The run's parameters from the panel, validated, with an output stem that overwrites no earlier run;
        `input_path` defaults to the layer's file. Raises InputProblem or ParameterError when the panel cannot
        make a run."""
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise InputProblem("Choose a raster layer (an orthophoto) first.")
        source = layer_file(layer)
        heights = self.height_check.isChecked()
        params = SegmentationParams(
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
        )
        params.validate()
        stem = Path(QgsProviderRegistry.instance().decodeUri("gdal", source).get("path") or source).stem
        params = replace(params, output_stem=free_output_stem(Path(params.output_dir), stem))
        try:
            check_run_paths(params, inputs=(source,))
        except OutputPathError as error:
            raise InputProblem(str(error)) from None
        return params

    def prepare_input(self, scratch: Path) -> str | None:
        """A VRT in `scratch` for a canvas extent or a polygon selection, in the raster's CRS; None for the
        whole layer. Raises InputProblem when the extent or selection cannot be used."""
        layer = self.layer_combo.currentLayer()
        mode = self.extent_combo.currentData()
        if mode == WHOLE_LAYER or not isinstance(layer, QgsRasterLayer):
            return None
        extent = mask = None
        if mode == CANVAS_EXTENT:
            canvas = self.iface.mapCanvas()
            transform = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), layer.crs(),
                                               QgsProject.instance())
            extent = transform.transformBoundingBox(canvas.extent())
        else:
            polygons = self.mask_combo.currentLayer()
            if not isinstance(polygons, QgsVectorLayer) or not polygons.selectedFeatureCount():
                raise InputProblem("Select one or more polygons in the polygon layer first.")
            mask = polygons.materialize(QgsFeatureRequest().setFilterFids(polygons.selectedFeatureIds()))
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        try:
            return prepare_input(layer, extent, mask, 0.0, context, scratch)
        except QgsProcessingException as error:
            raise InputProblem(str(error)) from error

    def run(self) -> None:
        """Start a run with the panel's settings; problems are shown in the panel, nothing starts."""
        if self.engine is None or self.task is not None or self._teaching:
            return
        if not self._input_not_a_result() or not self._run_anyway(self.memory_problem(), self.size_problem()):
            return
        scratch = None
        if self.extent_combo.currentData() != WHOLE_LAYER:
            scratch = Path(tempfile.mkdtemp(prefix="treeseg-input-"))
        try:
            params = self.build_params(self.prepare_input(scratch) if scratch else None)
        except (InputProblem, ParameterError) as problem:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            self.show_stage(str(problem), error=True)
            return
        self._save_settings()
        self._run_timing = (time.monotonic(), self._estimate_options())
        clear_messages(self.iface.messageBar())
        self.task = SegmentationTask(self.engine, params, self.layer_combo.currentLayer(), self.iface.messageBar(),
                                     scratch, hf_token())
        self.task.stage_changed.connect(self.show_stage)
        self.task.progressChanged.connect(self.show_progress)
        self.task.done.connect(self._finished)
        self.progress_bar.setValue(0)
        if self.elbow_image.isVisible():  # kept until this run's result, so Cancel stays where it was
            self.elbow_caption.setText(f"Last run: {self.elbow_caption.text()}")
        if self._probe is not None:
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
        self.iface.currentLayerChanged.disconnect(self.follow_active_layer)
        self._stop_probe()

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
            self._learn_from(task.record)
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
