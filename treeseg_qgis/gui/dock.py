"""The TreeSeg panel: choose a raster and the model settings, run, follow progress, cancel.

The panel builds a plain dict with the fields of SegmentationParams (that class
imports torch, which never loads inside QGIS) and hands it to a
SegmentationTask. A canvas extent or a polygon selection becomes a small GDAL
VRT in the raster's CRS, made here on the main thread before the task starts.
"""

from __future__ import annotations

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
from qgis.gui import QgisInterface, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine_client import EngineClient, missing_engine_message
from ..outputs import OutputPaths
from ..processing.compat import qgis_enum
from ..processing.raster_input import prepare_input
from .task import ProbeTask, SegmentationTask

MODEL_PARAMETERS_MILLIONS = {
    "small": 29, "small+": 29, "base": 86, "large": 300, "giant": 840, "mega": 6716, "large-sat": 300,
    "mega-sat": 6716,
}
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
RASTER_LAYERS = qgis_enum("Qgis.LayerFilter.RasterLayer", "QgsMapLayerProxyModel.Filter.RasterLayer")
POLYGON_LAYERS = qgis_enum("Qgis.LayerFilter.PolygonLayer", "QgsMapLayerProxyModel.Filter.PolygonLayer")
EXPORT_HINT = ("export it to a GeoTIFF first (right-click the layer ▸ Export ▸ Save As…) and run TreeSeg "
               "on that file")
UNTRAINED_TOOLTIP = (
    "When the DINOv3 weights cannot be loaded (no Hugging Face access or token), go on with randomly "
    "initialised weights instead of stopping. The result then only checks the pipeline; it is not a "
    "segmentation, and every output is marked UNTRAINED (file names, layer group, metadata)."
)


class InputProblem(ValueError):
    """The panel's settings cannot make a run; the message tells the user what to change."""


def model_label(name: str) -> str:
    """E.g. 'base — 86 M parameters, ~0.3 GB'."""
    millions = MODEL_PARAMETERS_MILLIONS[name]
    size = f"{millions / 1000:.1f} B" if millions >= 1000 else f"{millions} M"
    gigabytes = millions * 4 / 1000
    memory = f"~{gigabytes:.0f} GB" if gigabytes >= 10 else f"~{gigabytes:.1f} GB"
    return f"{name} — {size} parameters, {memory}"


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


class TreesegDock(QgsDockWidget):
    """The TreeSeg panel; `engine` is None when the engine environment is missing (Run is then disabled)."""

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__("TreeSeg (DINOv3)", parent)
        self.setObjectName("TreesegDock")
        self.iface = iface
        self.engine = engine
        self.task: SegmentationTask | None = None
        self._probe: ProbeTask | None = None
        self._probe_started = False
        self._build()
        self._restore_settings()
        self._update_enabled()

    def _build(self) -> None:
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(RASTER_LAYERS)
        active = self.iface.activeLayer()
        if isinstance(active, QgsRasterLayer):
            self.layer_combo.setLayer(active)
        self.extent_combo = QComboBox()
        for key, text in EXTENTS.items():
            self.extent_combo.addItem(text, key)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(POLYGON_LAYERS)
        self.mask_combo.setToolTip("The selected polygons of this layer limit the run; pixels outside are nodata.")
        self.model_combo = QComboBox()
        for name in MODEL_PARAMETERS_MILLIONS:
            self.model_combo.addItem(model_label(name), name)
        self.model_combo.setToolTip("DINOv3 backbone. The memory is that of the weights in float32 (CPU); "
                                    "about half on a GPU, plus working memory for the tiles.")
        self.model_override = QLineEdit()
        self.model_override.setPlaceholderText("optional: Hugging Face id or model folder")
        self.model_override.setToolTip("Overrides the model above with any DINOv3 ViT: a Hugging Face id "
                                       "(owner/name) or a local folder in Hugging Face format.")
        self.stride_combo = QComboBox()
        for stride in STRIDES:
            self.stride_combo.addItem(f"{stride} px", stride)
        stride_note = QLabel("Stride 8 costs 4 × the time of 16; stride 4 costs 16 ×.")
        stride_note.setWordWrap(True)
        self.auto_clusters = QCheckBox("Automatic")
        self.auto_clusters.setToolTip("Pick the number of clusters from the elbow of the k-means inertia (2–8).")
        self.clusters_spin = QSpinBox()
        self.clusters_spin.setRange(2, 250)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.engine_label = QLabel()
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.output_widget = QgsFileWidget()
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_widget.setDialogTitle("Output folder for TreeSeg results")
        self.allow_untrained = QCheckBox("Allow untrained weights (pipeline check only)")
        self.allow_untrained.setToolTip(UNTRAINED_TOOLTIP)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.stage_label = QLabel()
        self.stage_label.setWordWrap(True)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Raster layer", self.layer_combo)
        form.addRow("Extent", self.extent_combo)
        form.addRow("Polygon layer", self.mask_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Model override", self.model_override)
        form.addRow("Stride", self.stride_combo)
        form.addRow("", stride_note)
        clusters_row = QHBoxLayout()
        clusters_row.addWidget(self.auto_clusters)
        clusters_row.addWidget(self.clusters_spin, 1)
        form.addRow("Clusters", clusters_row)
        form.addRow("Device", self.device_combo)
        form.addRow("", self.engine_label)
        form.addRow("Output folder", self.output_widget)
        form.addRow(self.allow_untrained)
        self._form = form
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        column = QVBoxLayout()
        column.addLayout(form)
        column.addLayout(buttons)
        column.addWidget(self.progress_bar)
        column.addWidget(self.stage_label)
        column.addStretch(1)
        content = QWidget()
        content.setLayout(column)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        self.setWidget(scroll)

        self.extent_combo.currentIndexChanged.connect(self._update_enabled)
        self.auto_clusters.toggled.connect(self._update_enabled)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        if self.engine is None:
            self.engine_label.setText(f"<b>Engine missing.</b> {missing_engine_message()}")
            self.engine_label.setStyleSheet("color: #b00020;")
        else:
            self.engine_label.setText("Engine: starts when the panel opens…")

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

    @staticmethod
    def _select(combo: QComboBox, data: Any) -> None:
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)

    def _update_enabled(self) -> None:
        running = self.task is not None
        self.run_button.setEnabled(self.engine is not None and not running)
        self.cancel_button.setEnabled(running)
        self.clusters_spin.setEnabled(not self.auto_clusters.isChecked())
        polygons = self.extent_combo.currentData() == SELECTED_POLYGONS
        self.mask_combo.setVisible(polygons)
        self._form.labelForField(self.mask_combo).setVisible(polygons)

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        """Start the engine (and learn its device) the first time the panel is shown."""
        super().showEvent(event)
        if self.engine is not None and not self._probe_started:
            self._probe_started = True
            self.engine_label.setText("Engine: starting…")
            self._probe = ProbeTask(self.engine)
            self._probe.probed.connect(self._show_engine)
            QgsApplication.taskManager().addTask(self._probe)

    def _show_engine(self, description: str, ok: bool) -> None:
        self._probe = None
        if ok:
            self.engine_label.setText(f"Engine: {description}")
            self.engine_label.setStyleSheet("")
        else:
            self.engine_label.setText(f"<b>Engine not usable.</b> {description}")
            self.engine_label.setStyleSheet("color: #b00020;")
        if self.task is not None and self.task.status() == QgsTask.TaskStatus.OnHold:
            self.task.unhold()

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
        return {
            "input_path": input_path or source,
            "output_dir": str(folder),
            "output_stem": free_output_stem(folder, stem),
            "model": self.model_override.text().strip() or self.model_combo.currentData(),
            "stride": self.stride_combo.currentData(),
            "clusters": None if self.auto_clusters.isChecked() else self.clusters_spin.value(),
            "device": self.device_combo.currentText(),
            "allow_untrained": self.allow_untrained.isChecked(),
        }

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
        layer: QgsMapLayer = self.layer_combo.currentLayer()
        self.task = SegmentationTask(self.engine, params, layer, self.iface.messageBar(), scratch)
        self.task.stage_changed.connect(self._show_stage)
        self.task.progressChanged.connect(self._show_progress)
        self.task.done.connect(self._finished)
        self.progress_bar.setValue(0)
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
        """Cancel the running task and the probe (the plugin is unloading)."""
        self.cancel()
        if self._probe is not None:
            self._probe.probed.disconnect(self._show_engine)
            self._probe = None

    def _show_progress(self, percent: float) -> None:
        self.progress_bar.setValue(int(percent))

    def _show_stage(self, text: str, error: bool = False) -> None:
        self.stage_label.setText(text)
        self.stage_label.setStyleSheet("color: #b00020;" if error else "")

    def _finished(self, success: bool, summary: str) -> None:
        self.task = None
        if success:
            self.progress_bar.setValue(100)
        self._show_stage(f"Done: {summary}" if success else summary, error=not success and summary != "Cancelled.")
        self._update_enabled()
