"""Screenshots of the plugin in the real QGIS desktop: `make screenshot` runs this with `qgis.bin --code`.

Loads the bundled sample orthophoto, opens the TreeSeg panel and runs the small
model to completion with automatic K, tree crowns, the feature image and the
canopy height (untrained weights allowed: without Hugging Face access every
result is marked UNTRAINED). It saves the panel before the run as
docs/img/before-run.png (its estimate), then the main window as dock.png
(the panel with its More outputs and the elbow plot), crowns.png, features.png
and height.png (each output over the orthophoto), teaches trees by clicking
(examples placed through the map tool's own handler, then the threshold slider
moved) for teach.png, the Processing dialog of treeseg:segmenttrees as
processing.png, the same algorithm's styled outputs loaded by the toolbox as
processing_outputs.png and its batch dialog as batch.png; then quits QGIS (exit
status 0 when every image was written). The panel keeps the width QGIS gives a
new dock, and picks the sample because it is the active layer.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import qgis.utils
from qgis.core import QgsApplication, QgsPointXY, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QSize, Qt, QTimer
from qgis.PyQt.QtWidgets import QDockWidget

REPO = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd()
SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
OUTPUT = REPO / "output" / "screenshot"
IMAGES = REPO / "docs" / "img"
PLUGIN = "treeseg_qgis"
WINDOW = QSize(1600, 1000)
DIALOG = QSize(1280, 820)
LAYERS_WIDTH = 380
RUN_TIMEOUT_S = 900
RENDER_PAUSE_MS = 3000
POLL_MS = 500
# Pixels (column, row) of the sample: crowns of trees, and sand and shadow.
TREE_PIXELS = ((65, 90), (300, 110), (130, 330), (340, 360))
NOT_TREE_PIXELS = ((150, 240), (315, 265), (240, 130))
TAUGHT_THRESHOLD = 70
ZOOM_PIXELS = (100, 60, 300, 260)


class Screenshots:
    """Steps chained with timers so that QGIS keeps drawing between them."""

    def __init__(self) -> None:
        self.iface = qgis.utils.iface
        self.started = time.monotonic()
        self.plugin = None
        self.dock = None
        self.layer: QgsRasterLayer | None = None
        self.group = None
        self.dialog = None

    def start(self) -> None:
        window = self.iface.mainWindow()
        window.showNormal()
        window.resize(WINDOW)
        window.activateWindow()
        panels = {panel.objectName(): panel for panel in window.findChildren(QDockWidget)}
        panels["Browser"].hide()
        window.resizeDocks([panels["Layers"]], [LAYERS_WIDTH], Qt.Orientation.Horizontal)
        self.layer = QgsRasterLayer(str(SAMPLE), SAMPLE.stem)
        QgsProject.instance().addMapLayer(self.layer)
        self.iface.setActiveLayer(self.layer)
        if not (qgis.utils.loadPlugin(PLUGIN) and qgis.utils.startPlugin(PLUGIN)):
            return self.finish(f"The plugin {PLUGIN} could not be started: is it on QGIS_PLUGINPATH?")
        self.plugin = qgis.utils.plugins[PLUGIN]
        self.plugin.action.trigger()
        shutil.rmtree(OUTPUT, ignore_errors=True)
        dock = self.dock = self.plugin.dock
        if not self.panel_follows_the_active_layer():
            return self.finish("The panel did not follow the active layer.")
        dock.run_panel.model_combo.setCurrentIndex(dock.run_panel.model_combo.findData("small"))
        dock.run_panel.model_override.clear()
        dock.run_panel.extent_combo.setCurrentIndex(dock.run_panel.extent_combo.findData("layer"))
        dock.run_panel.auto_clusters.setChecked(True)
        dock.run_panel.allow_untrained.setChecked(True)
        dock.run_panel.crowns_check.setChecked(True)
        dock.run_panel.features_check.setChecked(True)
        dock.run_panel.height_check.setChecked(True)
        dock.run_panel.height_model_override.clear()
        dock.run_panel.extras_group.setCollapsed(False)
        dock.run_panel.output_widget.setFilePath(str(OUTPUT))
        self.after_render(self.run)

    def run(self) -> None:
        """The panel before the first run (its estimate counts the model load still to come), then Run."""
        panel = self.dock.run_panel
        print(f"screenshot: before the run the panel says: {panel.memory_label.text()}", flush=True)
        for name, widget in (("stride", panel.stride_combo), ("precision", panel.precision_combo)):
            print(f"screenshot: the {name} tooltip: {widget.toolTip()}", flush=True)
        self.save(self.dock.grab(), "before-run.png")
        panel.run_button.click()
        self.wait(lambda: panel.task is None, self.show_run, "the run")

    def panel_follows_the_active_layer(self) -> bool:
        """Whether the panel shows the active raster, also after another raster was made active and back."""
        shown = [self.dock.run_panel.layer_combo.currentLayer()]
        other = QgsRasterLayer(str(SAMPLE), "another raster")
        QgsProject.instance().addMapLayer(other)
        self.iface.setActiveLayer(other)
        shown.append(self.dock.run_panel.layer_combo.currentLayer())
        self.iface.setActiveLayer(self.layer)
        shown.append(self.dock.run_panel.layer_combo.currentLayer())
        names = [layer.name() if layer is not None else None for layer in shown]
        print(f"screenshot: with the sample, another raster and the sample active, the panel showed {names}",
              flush=True)
        QgsProject.instance().removeMapLayer(other.id())
        return names == [self.layer.name(), "another raster", self.layer.name()]

    def wait(self, condition: Callable[[], bool], then: Callable[[], None], what: str) -> None:
        """Call `then` once `condition()` holds, polling while QGIS keeps running; give up after the timeout."""
        if condition():
            QTimer.singleShot(0, then)
        elif time.monotonic() - self.started > RUN_TIMEOUT_S:
            self.finish(f"{what} did not finish in {RUN_TIMEOUT_S} s: {self.dock.run_panel.stage_label.text()}")
        else:
            QTimer.singleShot(POLL_MS, lambda: self.wait(condition, then, what))

    def show_run(self) -> None:
        if not self.dock.run_panel.stage_label.text().startswith("Done"):
            return self.finish(f"The run failed: {self.dock.run_panel.stage_label.text()}")
        self.close_task_messages()
        root = QgsProject.instance().layerTreeRoot()
        root.findLayer(self.layer.id()).setExpanded(False)
        self.group = root.children()[0]
        self.dock.teach_panel.setCollapsed(True)
        self.dock.widget().ensureWidgetVisible(self.dock.run_panel.elbow_image)
        self.zoom_to(self.layer.extent())
        self.after_render(lambda: self.grab("dock.png", self.show_crowns))

    def show_crowns(self) -> None:
        self.show_only("Tree crowns")
        x0, y0, x1, y1 = ZOOM_PIXELS
        corner, far = self.map_point(x0, y1), self.map_point(x1, y0)
        self.zoom_to(QgsRectangle(corner.x(), corner.y(), far.x(), far.y()))
        self.after_render(lambda: self.grab("crowns.png", self.show_features))

    def show_features(self) -> None:
        self.show_only("Feature image")
        self.zoom_to(self.layer.extent())
        self.after_render(lambda: self.grab("features.png", self.show_height))

    def show_height(self) -> None:
        self.show_only("Canopy height")
        self.after_render(lambda: self.grab("height.png", self.teach))

    def teach(self) -> None:
        """Click examples with the teach tool (its own handler), apply, then move the threshold slider."""
        self.show_only()
        dock = self.dock
        dock.teach_panel.setCollapsed(False)
        dock.teach_panel.teach_button.click()
        for column, row in TREE_PIXELS:
            dock.teach_panel.teach_tool.add_example(self.map_point(column, row), True)
        for column, row in NOT_TREE_PIXELS:
            dock.teach_panel.teach_tool.add_example(self.map_point(column, row), False)
        dock.teach_panel.apply_teach_button.click()
        self.wait(lambda: self.taught(dock.teach_panel.threshold_slider.value()), self.move_threshold, "teaching")

    def move_threshold(self) -> None:
        self.dock.teach_panel.threshold_slider.setValue(TAUGHT_THRESHOLD)
        self.wait(lambda: self.taught(TAUGHT_THRESHOLD), self.show_teach, "re-teaching")

    def taught(self, threshold: int) -> bool:
        """Whether the teach layers for `threshold` (in hundredths) are in the layer tree."""
        root = QgsProject.instance().layerTreeRoot()
        return self.dock.teach_panel.teach_task is None and any(
            node.name().startswith(f"Taught trees (score ≥ {threshold / 100:.2f}") for node in root.findLayers())

    def show_teach(self) -> None:
        self.close_task_messages()
        dock = self.dock
        dock.widget().ensureWidgetVisible(dock.teach_panel.teach_status)
        self.after_render(lambda: self.grab("teach.png", self.show_processing))

    def show_processing(self) -> None:
        import processing

        self.dialog = processing.createAlgorithmDialog("treeseg:segmenttrees", {})
        if self.dialog is None:
            return self.finish("The Processing algorithm treeseg:segmenttrees is not registered.")
        self.dialog.resize(DIALOG)
        self.dialog.show()
        QTimer.singleShot(RENDER_PAUSE_MS, self.grab_processing_dialog)

    def grab_processing_dialog(self) -> None:
        self.save(self.dialog.grab(), "processing.png")
        self.dialog.close()
        QTimer.singleShot(0, self.run_processing)

    def run_processing(self) -> None:
        """segmenttrees with temporary outputs as the toolbox runs it: the outputs load styled, in one group on
        top, and the plugin itself switches the panel's older results of the sample off (a second run)."""
        import processing

        self.dock.teach_panel.teach_button.setChecked(False)
        self.dock.teach_panel.teach_tool.clear()
        for group in QgsProject.instance().layerTreeRoot().children()[:-1]:
            group.setExpanded(False)
        outputs = ("OUTPUT_CLUSTERS", "OUTPUT_TREES", "OUTPUT_POLYGONS", "OUTPUT_CROWNS")
        processing.runAndLoadResults("treeseg:segmenttrees", {
            "INPUT": self.layer, "MODEL": "small", "CLUSTERS": 0, "ALLOW_UNTRAINED": True,
            **{name: "TEMPORARY_OUTPUT" for name in outputs}})
        groups = [(group.name(), group.itemVisibilityChecked()) for group in
                  QgsProject.instance().layerTreeRoot().children()]
        print(f"screenshot: after the Processing run the layer tree holds (name, shown): {groups}", flush=True)
        self.zoom_to(self.layer.extent())
        self.after_render(lambda: self.grab("processing_outputs.png", self.show_batch))

    def show_batch(self) -> None:
        from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog

        algorithm = QgsApplication.processingRegistry().createAlgorithmById("treeseg:segmenttrees")
        self.dialog = BatchAlgorithmDialog(algorithm, self.iface.mainWindow())
        self.dialog.resize(DIALOG)
        self.dialog.show()
        QTimer.singleShot(RENDER_PAUSE_MS, self.grab_batch_dialog)

    def grab_batch_dialog(self) -> None:
        table = self.dialog.mainWidget().tblParameters
        shown = [column for column in range(table.columnCount()) if not table.isColumnHidden(column)]
        print(f"screenshot: the batch dialog shows {len(shown)} of {table.columnCount()} columns, "
              f"{sum(table.columnWidth(column) for column in shown)} px wide", flush=True)
        self.save(self.dialog.grab(), "batch.png")
        self.dialog.close()
        self.finish()

    def show_only(self, name_start: str | None = None) -> None:
        """In the run's group, show only the layer whose name starts with `name_start` (None: none of them)."""
        for node in self.group.findLayers():
            node.setItemVisibilityChecked(name_start is not None and node.name().startswith(name_start))

    def map_point(self, column: float, row: float) -> QgsPointXY:
        """The centre of a pixel of the sample, in its CRS (the project's)."""
        extent = self.layer.extent()
        return QgsPointXY(extent.xMinimum() + (column + 0.5) * self.layer.rasterUnitsPerPixelX(),
                          extent.yMaximum() - (row + 0.5) * self.layer.rasterUnitsPerPixelY())

    def zoom_to(self, extent: QgsRectangle) -> None:
        canvas = self.iface.mapCanvas()
        canvas.setExtent(extent)
        canvas.refreshAllLayers()

    def close_task_messages(self) -> None:
        bar = self.iface.messageBar()
        for item in bar.items():
            if item.title() == "Task complete":
                bar.popWidget(item)

    def after_render(self, then: Callable[[], None]) -> None:
        QTimer.singleShot(RENDER_PAUSE_MS, then)

    def grab(self, name: str, then: Callable[[], None]) -> None:
        self.save(self.iface.mainWindow().grab(), name)
        then()

    def save(self, pixmap, name: str) -> None:
        IMAGES.mkdir(parents=True, exist_ok=True)
        pixmap.save(str(IMAGES / name))
        print(f"screenshot: {IMAGES / name}", flush=True)

    def finish(self, problem: str | None = None) -> None:
        if problem:
            print(f"screenshot: {problem}", flush=True)
        QgsProject.instance().clear()
        QgsApplication.exit(1 if problem else 0)


screenshots = Screenshots()
QTimer.singleShot(1000, screenshots.start)
