"""Screenshots of the plugin in the real QGIS desktop: `make screenshot` runs this with `qgis.bin --code`.

Loads the bundled sample orthophoto, opens the TreeSeg panel, runs the small
model to completion (untrained weights allowed: without Hugging Face access the
result is marked UNTRAINED), and saves the main window as docs/img/dock.png and
the Processing dialog of treeseg:segmenttrees as docs/img/processing.png, then
quits QGIS (exit status 0 when both images were written).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QSize, Qt, QTimer
from qgis.PyQt.QtWidgets import QDockWidget

REPO = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd()
SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
OUTPUT = REPO / "output" / "screenshot"
IMAGES = REPO / "docs" / "img"
PLUGIN = "treeseg_qgis"
WINDOW = QSize(1600, 1000)
DIALOG = QSize(1280, 820)
DOCK_WIDTH = 420
LAYERS_WIDTH = 380
RUN_TIMEOUT_S = 600
RENDER_PAUSE_MS = 3000


class Screenshots:
    """Steps chained with timers so that QGIS keeps drawing between them."""

    def __init__(self) -> None:
        self.iface = qgis.utils.iface
        self.started = time.monotonic()
        self.plugin = None
        self.dialog = None
        self.failed = False

    def start(self) -> None:
        window = self.iface.mainWindow()
        window.showNormal()
        window.resize(WINDOW)
        window.activateWindow()
        panels = {panel.objectName(): panel for panel in window.findChildren(QDockWidget)}
        panels["Browser"].hide()
        window.resizeDocks([panels["Layers"]], [LAYERS_WIDTH], Qt.Orientation.Horizontal)
        layer = QgsRasterLayer(str(SAMPLE), SAMPLE.stem)
        QgsProject.instance().addMapLayer(layer)
        self.iface.setActiveLayer(layer)
        if not (qgis.utils.loadPlugin(PLUGIN) and qgis.utils.startPlugin(PLUGIN)):
            return self.finish(f"The plugin {PLUGIN} could not be started: is it on QGIS_PLUGINPATH?")
        self.plugin = qgis.utils.plugins[PLUGIN]
        self.plugin.action.trigger()
        window.resizeDocks([self.plugin.dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
        shutil.rmtree(OUTPUT, ignore_errors=True)
        dock = self.plugin.dock
        dock.layer_combo.setLayer(layer)
        dock.model_combo.setCurrentIndex(dock.model_combo.findData("small"))
        dock.model_override.clear()
        dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("layer"))
        dock.auto_clusters.setChecked(True)
        dock.allow_untrained.setChecked(True)
        dock.output_widget.setFilePath(str(OUTPUT))
        dock.run_button.click()
        QTimer.singleShot(500, self.wait_for_run)

    def wait_for_run(self) -> None:
        dock = self.plugin.dock
        if dock.task is not None:
            if time.monotonic() - self.started > RUN_TIMEOUT_S:
                return self.finish(f"The run did not finish in {RUN_TIMEOUT_S} s: {dock.stage_label.text()}")
            QTimer.singleShot(500, self.wait_for_run)
            return
        if not dock.stage_label.text().startswith("Done"):
            return self.finish(f"The run failed: {dock.stage_label.text()}")
        bar = self.iface.messageBar()
        for item in bar.items():
            if item.title() == "Task complete":
                bar.popWidget(item)
        layer = self.plugin.dock.layer_combo.currentLayer()
        QgsProject.instance().layerTreeRoot().findLayer(layer.id()).setExpanded(False)
        self.iface.mapCanvas().setExtent(layer.extent())
        self.iface.mapCanvas().refreshAllLayers()
        QTimer.singleShot(RENDER_PAUSE_MS, self.grab_main_window)

    def grab_main_window(self) -> None:
        IMAGES.mkdir(parents=True, exist_ok=True)
        self.iface.mainWindow().grab().save(str(IMAGES / "dock.png"))
        print(f"screenshot: {IMAGES / 'dock.png'}", flush=True)
        import processing

        self.dialog = processing.createAlgorithmDialog("treeseg:segmenttrees", {})
        if self.dialog is None:
            return self.finish("The Processing algorithm treeseg:segmenttrees is not registered.")
        self.dialog.resize(DIALOG)
        self.dialog.show()
        QTimer.singleShot(RENDER_PAUSE_MS, self.grab_processing_dialog)

    def grab_processing_dialog(self) -> None:
        self.dialog.grab().save(str(IMAGES / "processing.png"))
        print(f"screenshot: {IMAGES / 'processing.png'}", flush=True)
        self.dialog.close()
        self.finish()

    def finish(self, problem: str | None = None) -> None:
        if problem:
            print(f"screenshot: {problem}", flush=True)
        QgsProject.instance().clear()
        QgsApplication.exit(1 if problem else 0)


screenshots = Screenshots()
QTimer.singleShot(1000, screenshots.start)
