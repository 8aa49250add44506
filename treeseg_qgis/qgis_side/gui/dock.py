"""The TreeSeg panel: choose a raster and the model settings, run, follow progress, cancel; then teach.

The panel builds a plain dict with the fields of SegmentationParams (that class
imports torch, which never loads inside QGIS) and hands it to a
SegmentationTask. A canvas extent or a polygon selection becomes a small GDAL
VRT in the raster's CRS, made here on the main thread before the task starts.
After a run, clicks on the map (gui/teach_tool.py) teach trees (or any class) by example: a
TeachTask runs on the same input with the same model and stride, so the
engine reads the features the run cached instead of running the model.
"""

from __future__ import annotations

import html
import shutil
import tempfile
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
from qgis.gui import QgisInterface, QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QPixmap
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
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
    format_gigabytes,
    memory_warning,
    model_entry,
    size_warning,
    tiles_and_time,
)
from ...outputs import OutputPathError, OutputPaths, check_run_paths
from ..auth import hf_token
from ..compat import POLYGON_LAYER_FILTER, RASTER_LAYER_FILTER
from ..engine_client import EngineClient, missing_engine_message
from ..processing.segment_trees import DEFAULT_HEIGHT_MODEL
from ..raster_input import prepare_input
from .task import ProbeTask, SegmentationTask, TeachTask, clear_messages
from .teach_tool import RasterGrid, TeachMapTool

DEFAULT_MODEL = "base"
STRIDES = (16, 8, 4)
DEVICES = ("auto", "cpu", "cuda", "mps")
WHOLE_LAYER, CANVAS_EXTENT, SELECTED_POLYGONS = "layer", "canvas", "selection"
EXTENTS = {
    WHOLE_LAYER: "Whole layer",
    CANVAS_EXTENT: "Current map canvas extent",
    SELECTED_POLYGONS: "Selected polygons of a layer",
}
SETTINGS_PREFIX = "treeseg/dock/"
EXPORT_HINT = ("export it to a GeoTIFF first (right-click the layer ▸ Export ▸ Save As…) and run TreeSeg "
               "on that file")
UNTRAINED_TOOLTIP = (
    "When the DINOv3 weights cannot be loaded (no Hugging Face access or token), go on with randomly "
    "initialised weights instead of stopping. The result then only checks the pipeline; it is not a "
    "segmentation, and every output is marked UNTRAINED (file names, layer group, metadata)."
)
DEFAULT_THRESHOLD = 0.6
DEFAULT_CLASS = "tree"
TEACH_DEBOUNCE_MS = 300
ELBOW_WIDTH = 260
"""Fits the width QGIS gives a new dock (about 300 px) beside the scroll bar."""
COMBO_MIN_CHARACTERS = 12
"""Combo boxes shrink to this many characters, so long layer and model names never make the panel scroll sideways."""
MODEL_COMBO_MIN_CHARACTERS = 9
"""The longest catalogue name (large-sat), leaving room for the Models… button beside it."""
TEACH_HELP = ("Name the class to teach (a tree, a dead tree, a roof…). Left click on the map: an example of it. "
              "Shift+click or right click: something else. The threshold is chosen from your examples unless you "
              "move the slider. Teaching works on the input of the last run and reuses its cached features, so the "
              "model does not run again.")


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
            {"output_dir": str(folder), "output_stem": candidate}, untrained).all()):
        number += 1
        candidate = f"{stem}_{number}"
    return candidate


def default_output_folder() -> str:
    """A 'treeseg' folder in the project's home, or in the system's temporary folder."""
    home = QgsProject.instance().homePath()
    return str(Path(home or tempfile.gettempdir()) / "treeseg")


def _collapsible_group(title: str, object_name: str, layout: QLayout) -> QgsCollapsibleGroupBox:
    group = QgsCollapsibleGroupBox(title)
    group.setObjectName(object_name)
    group.setSaveCollapsedState(False)
    group.setLayout(layout)
    return group


class TreesegDock(QgsDockWidget):
    """The TreeSeg panel; `engine` is None when the engine environment is missing (Run is then disabled and
    `engine_setup_requested` asks for the set-up dialog)."""

    engine_setup_requested = pyqtSignal()
    models_requested = pyqtSignal()

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__("TreeSeg (DINOv3)", parent)
        self.setObjectName("TreesegDock")
        self.iface = iface
        self.engine = engine
        self.task: SegmentationTask | None = None
        self.teach_task: TeachTask | None = None
        self._probe: ProbeTask | None = None
        self._engine_info: dict[str, Any] | None = None
        self._probe_started = False
        self._engine_unusable = False
        self._last_run: dict[str, Any] | None = None
        self._last_run_layer_id = ""
        self._last_run_scratch: Path | None = None
        self._teach_layer_ids: list[str] = []
        self._teach_outputs: list[str] = []
        self._teach_again = False
        self.teach_tool: TeachMapTool | None = None
        self._build()
        self._restore_settings()
        self._update_enabled()

    def _build(self) -> None:
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(RASTER_LAYER_FILTER)
        self.layer_combo.setToolTip("Follows the active raster layer until you choose one here.")
        self._layer_chosen = False
        self.follow_active_layer(self.iface.activeLayer())
        self.extent_combo = QComboBox()
        for key, text in EXTENTS.items():
            self.extent_combo.addItem(text, key)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(POLYGON_LAYER_FILTER)
        self.mask_combo.setToolTip("The selected polygons of this layer limit the run; pixels outside are nodata.")
        self.model_combo = QComboBox()
        for name, model in BACKBONES.items():
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1,
                                         f"{model.label}, {parameters_label(model.params_millions)}",
                                         Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setToolTip("DINOv3 backbone; the line below gives its size and the memory a run needs. "
                                    "Greyed while a model override is set.")
        self.models_button = QPushButton("Models…")
        self.models_button.setToolTip("Which models are on this computer: download, delete, the Hugging Face "
                                      "token, a local model folder")
        self.memory_label = QLabel()
        self.memory_label.setWordWrap(True)
        self.model_override = QLineEdit()
        self.model_override.setPlaceholderText("optional: Hugging Face id or model folder")
        self.model_override.setToolTip("Overrides the model above with any DINOv3 ViT: a Hugging Face id "
                                       "(owner/name) or a local folder in Hugging Face format. The line below "
                                       "names the model that runs.")
        self.stride_combo = QComboBox()
        for stride in STRIDES:
            self.stride_combo.addItem(f"{stride} px", stride)
        self.stride_combo.setToolTip("Stride 8 costs 4 × the time of 16; stride 4 costs 16 ×.")
        self.auto_clusters = QCheckBox("Automatic")
        self.auto_clusters.setToolTip("Pick the number of clusters from the elbow of the k-means inertia (2–8).")
        self.clusters_spin = QSpinBox()
        self.clusters_spin.setRange(2, 250)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        for combo in (self.layer_combo, self.extent_combo, self.mask_combo, self.model_combo, self.stride_combo,
                      self.device_combo):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(COMBO_MIN_CHARACTERS)
        self.model_combo.setMinimumContentsLength(MODEL_COMBO_MIN_CHARACTERS)
        self.engine_label = QLabel()
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setup_button = QPushButton("Set up the engine…")
        self.setup_button.setToolTip("Install the engine (torch, transformers) in a Python environment of its own")
        self.output_widget = QgsFileWidget()
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_widget.setDialogTitle("Output folder for TreeSeg results")
        self.allow_untrained = QCheckBox("Allow untrained weights")
        self.allow_untrained.setToolTip(UNTRAINED_TOOLTIP)
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
        self.extras_group = self._build_extras()
        self.teach_group = self._build_teach()

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.addRow("Raster layer", self.layer_combo)
        form.addRow("Extent", self.extent_combo)
        form.addRow("Polygon layer", self.mask_combo)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.models_button)
        form.addRow("Model", model_row)
        form.addRow("Model override", self.model_override)
        form.addRow("Stride", self.stride_combo)
        clusters_row = QHBoxLayout()
        clusters_row.addWidget(self.auto_clusters)
        clusters_row.addWidget(self.clusters_spin, 1)
        form.addRow("Clusters", clusters_row)
        self.cluster_model_widget = QgsFileWidget()
        self.cluster_model_widget.setFilter("TreeSeg cluster model (*.treeseg)")
        self.cluster_model_widget.setToolTip("Optional: a survey's cluster model (python -m treeseg_qgis fit, or "
                                             "Processing ▸ Surveys). Its clusters are applied as they are, so this "
                                             "raster gets the survey's cluster ids and legend; Clusters is ignored.")
        form.addRow("Cluster model", self.cluster_model_widget)
        form.addRow("Device", self.device_combo)
        form.addRow(self.memory_label)
        form.addRow(self.engine_label)
        form.addRow(self.setup_button)
        form.addRow("Output folder", self.output_widget)
        form.addRow(self.allow_untrained)
        self._form = form
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        column = QVBoxLayout()
        column.addLayout(form)
        column.addWidget(self.extras_group)
        column.addLayout(buttons)
        column.addWidget(self.progress_bar)
        column.addWidget(self.stage_label)
        column.addWidget(self.elbow_caption)
        column.addWidget(self.elbow_image)
        column.addWidget(self.teach_group)
        column.addStretch(1)
        content = QWidget()
        content.setLayout(column)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        self.setWidget(scroll)

        self.extent_combo.currentIndexChanged.connect(self._update_enabled)
        self.extent_combo.currentIndexChanged.connect(self._show_memory_estimate)
        self.layer_combo.layerChanged.connect(self._show_memory_estimate)
        self.auto_clusters.toggled.connect(self._update_enabled)
        self.crowns_check.toggled.connect(self._update_enabled)
        self.height_check.toggled.connect(self._update_enabled)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.teach_button.toggled.connect(self._toggle_teach_tool)
        self.clear_examples_button.clicked.connect(self._clear_examples)
        self.threshold_slider.valueChanged.connect(self._threshold_moved)
        self.auto_threshold.toggled.connect(self._auto_threshold_toggled)
        self.class_edit.editingFinished.connect(self._show_examples)
        self.teach_timer.timeout.connect(self._teach_again_or_now)
        self.apply_teach_button.clicked.connect(self.teach)
        self.setup_button.clicked.connect(self.engine_setup_requested)
        self.models_button.clicked.connect(self.models_requested)
        self.layer_combo.activated.connect(self._layer_picked)
        self.iface.currentLayerChanged.connect(self.follow_active_layer)
        self.model_combo.currentIndexChanged.connect(self._show_memory_estimate)
        self.model_override.textChanged.connect(self._show_memory_estimate)
        self.stride_combo.currentIndexChanged.connect(self._show_memory_estimate)
        self.device_combo.currentTextChanged.connect(self._show_memory_estimate)
        self._show_engine_presence()

    def _build_extras(self) -> QgsCollapsibleGroupBox:
        """The 'More outputs' group: crowns, feature image, canopy height."""
        self.crowns_check = QCheckBox("Tree crowns")
        self.crowns_check.setToolTip("One polygon per tree crown (watershed of the tree mask from the crown "
                                     "centres), with area, perimeter, diameter and centroid.")
        self.crown_min_area = QDoubleSpinBox()
        self.crown_min_area.setRange(0.0, 1000.0)
        self.crown_min_area.setDecimals(1)
        self.crown_min_area.setPrefix("≥ ")
        self.crown_min_area.setSuffix(" m²")
        self.crown_min_area.setToolTip("Minimum crown area: crowns smaller than this are dropped.")
        self.features_check = QCheckBox("Feature image")
        self.features_check.setToolTip("The first three principal components of the DINOv3 features as an RGB "
                                       "image: what the model tells apart.")
        self.height_check = QCheckBox("Canopy height")
        self.height_check.setToolTip(f"Metres per pixel from the DINOv3 canopy-height head ({DEFAULT_HEIGHT_MODEL}, "
                                     "gated like the backbones).")
        self.min_height_spin = QDoubleSpinBox()
        self.min_height_spin.setRange(0.0, 100.0)
        self.min_height_spin.setDecimals(1)
        self.min_height_spin.setSingleStep(0.5)
        self.min_height_spin.setPrefix("≥ ")
        self.min_height_spin.setSuffix(" m")
        self.min_height_spin.setSpecialValueText("any height")
        self.min_height_spin.setToolTip("Minimum tree height: tree pixels lower than this are dropped, which "
                                        "separates trees from grass and shrubs of the same colour.")
        self.height_model_override = QLineEdit()
        self.height_model_override.setPlaceholderText("optional: canopy-height model id or folder")
        self.height_model_override.setToolTip(f"Overrides {DEFAULT_HEIGHT_MODEL} with another CHMv2 model: a "
                                              "Hugging Face id or a local folder in Hugging Face format.")
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.addRow(self.crowns_check, self.crown_min_area)
        form.addRow(self.features_check)
        form.addRow(self.height_check, self.min_height_spin)
        form.addRow("Height model", self.height_model_override)
        return _collapsible_group("More outputs", "TreesegMoreOutputs", form)

    def _build_teach(self) -> QgsCollapsibleGroupBox:
        """The 'Teach by clicking' group: the map tool, the examples, the threshold and Apply."""
        note = QLabel(TEACH_HELP)
        note.setWordWrap(True)
        self.teach_button = QPushButton("Click examples")
        self.teach_button.setToolTip("Click trees and not-trees on the map")
        self.teach_button.setCheckable(True)
        self.clear_examples_button = QPushButton("Clear")
        self.clear_examples_button.setToolTip("Forget the examples clicked so far")
        self.examples_label = QLabel()
        self.examples_label.setWordWrap(True)
        self.class_edit = QLineEdit(DEFAULT_CLASS)
        self.class_edit.setToolTip("What the examples show; it names the outputs (e.g. dead tree → "
                                   "<stem>_taught_dead_tree.tif).")
        self.auto_threshold = QCheckBox("Automatic threshold")
        self.auto_threshold.setToolTip("Leave one out over your clicks: each example is scored by the others, and "
                                       "the threshold that best separates the two kinds is used. Moving the slider "
                                       "sets the threshold yourself.")
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setToolTip("Pixels scoring at least this belong to the class. Moving it re-thresholds "
                                         "from the cached features.")
        self.threshold_label = QLabel()
        self.threshold_label.setMinimumWidth(self.threshold_label.fontMetrics().horizontalAdvance("0.000"))
        self.apply_teach_button = QPushButton("Apply")
        self.teach_status = QLabel()
        self.teach_status.setWordWrap(True)
        self.teach_timer = QTimer(self)
        self.teach_timer.setSingleShot(True)
        self.teach_timer.setInterval(TEACH_DEBOUNCE_MS)
        class_row = QHBoxLayout()
        class_row.addWidget(QLabel("Class"))
        class_row.addWidget(self.class_edit, 1)
        tool_row = QHBoxLayout()
        tool_row.addWidget(self.teach_button, 1)
        tool_row.addWidget(self.clear_examples_button)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(QLabel("Threshold"))
        threshold_row.addWidget(self.threshold_slider, 1)
        threshold_row.addWidget(self.threshold_label)
        column = QVBoxLayout()
        column.addWidget(note)
        column.addLayout(class_row)
        column.addLayout(tool_row)
        column.addWidget(self.examples_label)
        column.addWidget(self.auto_threshold)
        column.addLayout(threshold_row)
        column.addWidget(self.apply_teach_button)
        column.addWidget(self.teach_status)
        group = _collapsible_group("Teach by clicking", "TreesegTeach", column)
        group.setCollapsed(True)
        return group

    def _restore_settings(self) -> None:
        settings = QgsSettings()
        self._select(self.model_combo, settings.value(SETTINGS_PREFIX + "model", DEFAULT_MODEL, type=str))
        self.model_override.setText(settings.value(SETTINGS_PREFIX + "model_override", "", type=str))
        self._select(self.stride_combo, settings.value(SETTINGS_PREFIX + "stride", 16, type=int))
        self.auto_clusters.setChecked(settings.value(SETTINGS_PREFIX + "auto_clusters", True, type=bool))
        self.clusters_spin.setValue(settings.value(SETTINGS_PREFIX + "clusters", 5, type=int))
        self.device_combo.setCurrentText(settings.value(SETTINGS_PREFIX + "device", "auto", type=str))
        self._select(self.extent_combo, settings.value(SETTINGS_PREFIX + "extent", WHOLE_LAYER, type=str))
        self.output_widget.setFilePath(settings.value(SETTINGS_PREFIX + "output_dir", "", type=str)
                                       or default_output_folder())
        self.crowns_check.setChecked(settings.value(SETTINGS_PREFIX + "crowns", False, type=bool))
        self.crown_min_area.setValue(settings.value(SETTINGS_PREFIX + "crown_min_area_m2", 2.0, type=float))
        self.features_check.setChecked(settings.value(SETTINGS_PREFIX + "feature_preview", False, type=bool))
        self.height_check.setChecked(settings.value(SETTINGS_PREFIX + "canopy_height", False, type=bool))
        self.min_height_spin.setValue(settings.value(SETTINGS_PREFIX + "min_tree_height_m", 0.0, type=float))
        self.height_model_override.setText(settings.value(SETTINGS_PREFIX + "height_model_override", "", type=str))
        threshold = settings.value(SETTINGS_PREFIX + "teach_threshold", DEFAULT_THRESHOLD, type=float)
        self._show_threshold(threshold)
        self.auto_threshold.setChecked(settings.value(SETTINGS_PREFIX + "teach_threshold_auto", True, type=bool))
        self.class_edit.setText(settings.value(SETTINGS_PREFIX + "teach_class", DEFAULT_CLASS, type=str))
        self.extras_group.setCollapsed(not any(check.isChecked() for check in (
            self.crowns_check, self.features_check, self.height_check)))
        self._show_examples()

    def _save_settings(self) -> None:
        settings = QgsSettings()
        settings.setValue(SETTINGS_PREFIX + "model", self.model_combo.currentData())
        settings.setValue(SETTINGS_PREFIX + "model_override", self.model_override.text().strip())
        settings.setValue(SETTINGS_PREFIX + "stride", self.stride_combo.currentData())
        settings.setValue(SETTINGS_PREFIX + "auto_clusters", self.auto_clusters.isChecked())
        settings.setValue(SETTINGS_PREFIX + "clusters", self.clusters_spin.value())
        settings.setValue(SETTINGS_PREFIX + "device", self.device_combo.currentText())
        settings.setValue(SETTINGS_PREFIX + "extent", self.extent_combo.currentData())
        settings.setValue(SETTINGS_PREFIX + "output_dir", self.output_widget.filePath())
        settings.setValue(SETTINGS_PREFIX + "crowns", self.crowns_check.isChecked())
        settings.setValue(SETTINGS_PREFIX + "crown_min_area_m2", self.crown_min_area.value())
        settings.setValue(SETTINGS_PREFIX + "feature_preview", self.features_check.isChecked())
        settings.setValue(SETTINGS_PREFIX + "canopy_height", self.height_check.isChecked())
        settings.setValue(SETTINGS_PREFIX + "min_tree_height_m", self.min_height_spin.value())
        settings.setValue(SETTINGS_PREFIX + "height_model_override", self.height_model_override.text().strip())

    @staticmethod
    def _select(combo: QComboBox, data: Any) -> None:
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)

    def _update_enabled(self) -> None:
        running = self.task is not None
        busy = running or self.teach_task is not None
        self.run_button.setEnabled(self.engine is not None and not self._engine_unusable and not busy)
        self.cancel_button.setEnabled(running)
        self.clusters_spin.setEnabled(not self.auto_clusters.isChecked())
        self.crown_min_area.setEnabled(self.crowns_check.isChecked())
        self.min_height_spin.setEnabled(self.height_check.isChecked())
        self.height_model_override.setEnabled(self.height_check.isChecked())
        teachable = self.engine is not None and self._last_run is not None
        self.teach_button.setEnabled(teachable)
        trees, others = self._example_counts()
        self.clear_examples_button.setEnabled(trees + others > 0)
        self.apply_teach_button.setEnabled(teachable and not busy and trees > 0)
        polygons = self.extent_combo.currentData() == SELECTED_POLYGONS
        self.mask_combo.setVisible(polygons)
        self._form.labelForField(self.mask_combo).setVisible(polygons)

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
            self.engine_label.setText(f"Engine: {description}")
            self.engine_label.setStyleSheet("")
        else:
            error = html.escape(description).replace("\n", "<br>")
            self.engine_label.setText(f"<b>Engine not usable.</b> {error}")
            self.engine_label.setStyleSheet("color: #b00020;")
        self.setup_button.setVisible(not ok)
        if self.task is not None and self.task.status() == QgsTask.TaskStatus.OnHold:
            self.task.unhold()

    def set_engine(self, engine: EngineClient | None) -> None:
        """Use `engine` from now on (the set-up dialog made or removed one): probed at once when the panel
        is open, else when it is next shown."""
        if self._probe is not None:
            self._probe.probed.disconnect(self._show_engine)
            self._probe = None
        self.engine = engine
        self._probe_started = False
        self._engine_unusable = False
        self._show_engine_presence()
        self._update_enabled()
        if engine is not None and self.isVisible():
            self._start_probe()

    def _show_engine_presence(self) -> None:
        """The engine label before the probe; the set-up button while there is no engine (the probe shows
        it for an unusable one too)."""
        if self.engine is None:
            self.engine_label.setText(f"<b>Engine missing.</b> {missing_engine_message()}")
            self.engine_label.setStyleSheet("color: #b00020;")
        else:
            self.engine_label.setText("Engine: starts when the panel opens…")
            self.engine_label.setStyleSheet("")
        self.setup_button.setVisible(self.engine is None)

    def _run_device(self) -> str:
        """cpu, cuda or mps: the device chosen, or for auto the one the engine's probe found (cpu before)."""
        chosen = self.device_combo.currentText()
        if chosen != "auto":
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
                            self._run_device())

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
                                                       RUN_TILE_SIZE, device)
        self.memory_label.setText(f"{model}: {memory}.")
        self.memory_label.setToolTip(override)
        will_not_fit = needed is not None and free is not None and needed > free
        self.memory_label.setStyleSheet("color: #b00020;" if will_not_fit else "")

    def follow_active_layer(self, layer: QgsMapLayer | None) -> None:
        """Show `layer` (the active layer of QGIS) when it is a raster and no layer was picked in the panel."""
        if not self._layer_chosen and isinstance(layer, QgsRasterLayer):
            self.layer_combo.setLayer(layer)

    def _layer_picked(self) -> None:
        """The user chose a layer in the panel: it stays until they choose another."""
        self._layer_chosen = True

    def build_params(self, input_path: str | None = None) -> dict[str, Any]:
        """The run's parameters (SegmentationParams fields) from the panel; `input_path` defaults to the
        layer's file. Raises InputProblem when the panel cannot make a run."""
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise InputProblem("Choose a raster layer (an orthophoto) first.")
        source = layer_file(layer)
        folder_text = self.output_widget.filePath().strip()
        if not folder_text:
            raise InputProblem("Choose an output folder.")
        folder = Path(folder_text)
        stem = Path(QgsProviderRegistry.instance().decodeUri("gdal", source).get("path") or source).stem
        params = {
            "input_path": input_path or source,
            "output_dir": str(folder),
            "output_stem": free_output_stem(folder, stem),
            "model": self.model_in_use(),
            "stride": self.stride_combo.currentData(),
            "clusters": None if self.auto_clusters.isChecked() else self.clusters_spin.value(),
            "device": self.device_combo.currentText(),
            "allow_untrained": self.allow_untrained.isChecked(),
            "crowns": self.crowns_check.isChecked(),
            "crown_min_area_m2": self.crown_min_area.value(),
            "feature_preview": self.features_check.isChecked(),
            "canopy_height": self.height_check.isChecked(),
            "min_tree_height_m": (self.min_height_spin.value() or None) if self.height_check.isChecked() else None,
            "height_model": self.height_model_override.text().strip() or DEFAULT_HEIGHT_MODEL,
            "cluster_model": self.cluster_model_widget.filePath().strip() or None,
        }
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
        if self.engine is None or self.task is not None:
            return
        problem = "\n\n".join(filter(None, [self.memory_problem(), self.size_problem()])) or None
        if problem is not None:
            answer = QMessageBox.question(self, "TreeSeg", f"{problem}\n\nRun anyway?",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                self._show_stage(problem, error=True)
                return
        scratch = None
        if self.extent_combo.currentData() != WHOLE_LAYER:
            scratch = Path(tempfile.mkdtemp(prefix="treeseg-input-"))
        try:
            params = self.build_params(self.prepare_input(scratch) if scratch else None)
        except InputProblem as problem:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            self._show_stage(str(problem), error=True)
            return
        self._save_settings()
        clear_messages(self.iface.messageBar())
        layer: QgsMapLayer = self.layer_combo.currentLayer()
        self.task = SegmentationTask(self.engine, params, layer, self.iface.messageBar(), scratch, hf_token())
        self.task.stage_changed.connect(self._show_stage)
        self.task.progressChanged.connect(self._show_progress)
        self.task.done.connect(self._finished)
        self.progress_bar.setValue(0)
        self._show_elbow(None)
        if self._probe is not None:
            self.task.hold()
            self._show_stage("Waiting for the engine to start…")
        else:
            self._show_stage("Starting…")
        QgsApplication.taskManager().addTask(self.task)
        self._update_enabled()

    def cancel(self) -> None:
        """Stop the running task; the engine removes what it had written."""
        if self.task is not None:
            self._show_stage("Cancelling…")
            self.task.cancel()

    def shutdown(self) -> None:
        """Cancel the running tasks and the probe, remove the teach tool and its markers and the last run's
        scratch input (the plugin is unloading)."""
        self.cancel()
        self.iface.currentLayerChanged.disconnect(self.follow_active_layer)
        self.teach_timer.stop()
        if self.teach_task is not None:
            self.teach_task.cancel()
        if self._probe is not None:
            self._probe.probed.disconnect(self._show_engine)
            self._probe = None
        if self.teach_tool is not None:
            canvas = self.iface.mapCanvas()
            if canvas.mapTool() is self.teach_tool:
                canvas.unsetMapTool(self.teach_tool)
            self.teach_tool.clear()
            self.teach_tool.deleteLater()
            self.teach_tool = None
        self._keep_scratch(None)

    def _show_progress(self, percent: float) -> None:
        self.progress_bar.setValue(int(percent))

    def _show_stage(self, text: str, error: bool = False) -> None:
        self.stage_label.setText(text)
        self.stage_label.setStyleSheet("color: #b00020;" if error else "")

    def _finished(self, success: bool, summary: str) -> None:
        task, self.task = self.task, None
        self.progress_bar.setValue(100 if success else 0)
        if success:
            self._show_elbow(task.record)
            self._prepare_teaching(task)
        self._show_stage(f"Done: {summary}" if success else summary, error=not success and summary != "Cancelled.")
        self._update_enabled()

    def _show_elbow(self, record: dict[str, Any] | None) -> None:
        """The elbow plot of a run with automatic K, with the K it chose; hidden otherwise."""
        elbow = record["outputs"].get("elbow") if record is not None else None
        pixmap = QPixmap(elbow) if elbow else QPixmap()
        if not pixmap.isNull():
            self.elbow_caption.setText(f"Automatic K = {record['clusters']['k']}: the elbow of the k-means inertia "
                                       "curve.")
            self.elbow_image.setPixmap(pixmap.scaledToWidth(ELBOW_WIDTH, Qt.TransformationMode.SmoothTransformation))
            self.elbow_image.setToolTip(elbow)
        self.elbow_caption.setVisible(not pixmap.isNull())
        self.elbow_image.setVisible(not pixmap.isNull())

    def _prepare_teaching(self, task: SegmentationTask) -> None:
        """Teach on the input of this run from now on; the examples and the teach layers of a run on another
        grid start afresh."""
        self._keep_scratch(task.scratch_folder)
        self._last_run = task.record["parameters"]
        self._last_run_layer_id = task.layer_id
        grid = RasterGrid.of_file(self._last_run["input_path"])
        if self.teach_tool is None:
            self.teach_group.setCollapsed(False)
            self.teach_tool = TeachMapTool(self.iface.mapCanvas())
            self.teach_tool.setButton(self.teach_button)
            self.teach_tool.examples_changed.connect(self._show_examples)
            self.teach_tool.click_ignored.connect(lambda: self._show_teach_status(
                "That click is off the raster of the last run; it was left out.", error=True))
        if grid != self.teach_tool.grid:
            self._teach_layer_ids, self._teach_outputs = [], []
        self.teach_tool.set_grid(grid)

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

    def _show_examples(self) -> None:
        trees, others = self._example_counts()
        taught = self._taught_class()
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
        if self.engine is None or self._last_run is None or self.task is not None or self.teach_task is not None:
            return
        layer = QgsProject.instance().mapLayer(self._last_run_layer_id)
        if not isinstance(layer, QgsRasterLayer):
            self._show_teach_status("The raster of the last run is no longer in the project; run again.", error=True)
            return
        examples = self.teach_tool.pixel_examples()
        taught = self._taught_class()
        if not any(is_tree for _, _, is_tree in examples):
            self._show_teach_status(f"Click at least one {taught} first.", error=True)
            return
        threshold = self._wanted_threshold()
        if threshold is not None:
            QgsSettings().setValue(SETTINGS_PREFIX + "teach_threshold", threshold)
        QgsSettings().setValue(SETTINGS_PREFIX + "teach_class", taught)
        folder = Path(self._last_run["output_dir"])
        params = {**self._last_run, "output_stem": free_output_stem(folder, f"{self._last_run['output_stem']}_teach")}
        self.teach_task = TeachTask(self.engine, params, examples, threshold, layer, self._teach_layer_ids,
                                    self._teach_outputs, hf_token(), class_name=taught)
        self.teach_task.progressChanged.connect(self._show_progress)
        self.teach_task.done.connect(self._teach_finished)
        self._teach_again = False
        self.progress_bar.setValue(0)
        self._show_teach_status(f"Teaching '{taught}' with threshold "
                                f"{'chosen from the examples' if threshold is None else f'{threshold:.2f}'}…")
        QgsApplication.taskManager().addTask(self.teach_task)
        self._update_enabled()

    def _teach_finished(self, success: bool, summary: str) -> None:
        task, self.teach_task = self.teach_task, None
        self.progress_bar.setValue(100 if success else 0)
        if success:
            self._teach_layer_ids = [layer.id() for layer in task.layers]
            self._teach_outputs = list(task.record["outputs"].values())
            if task.threshold is None:
                self._show_threshold(float(task.record["threshold"]))
        self._show_teach_status(summary, error=not success and summary != "Cancelled.")
        self._update_enabled()
        if self._teach_again and self._wanted_threshold() != task.threshold:
            self.teach()
        self._teach_again = False

    def _show_teach_status(self, text: str, error: bool = False) -> None:
        self.teach_status.setText(text)
        self.teach_status.setStyleSheet("color: #b00020;" if error else "")
