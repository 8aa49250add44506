"""The engine set-up as a new user meets it, in the real QGIS desktop: run by `qgis.bin --code` (see
scripts/engine_setup_screenshots.sh), with the packaged plugin in a throw-away profile.

TREESEG_SCENARIO=build: with a decoy python3 first on PATH, Install builds the engine from QGIS's Python
(docs/img/engine-ready.png), a run with the new engine adds its layers (engine-run.png), Repair cancelled
during pip keeps that engine (engine-cancelled.png), and Repair with PIP_INDEX_URL at a dead local address
ends in a plain-words message (engine-dead-index.png). TREESEG_SCENARIO=upgrade: the same profile after a
plugin version bump, whose engine is reused with nothing installed (engine-reused.png). Each scenario writes
what it saw to $TREESEG_OUT as JSON, then quits QGIS.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QSize, QTimer

REPO = Path(os.environ["TREESEG_REPO"])
SAMPLE = REPO / "resources" / "sample" / "OSBS_029.tif"
IMAGES = REPO / "docs" / "img"
PLUGIN = "treeseg_qgis"
DIALOG = QSize(900, 720)
TIMEOUT_S = 900
POLL_MS = 300
DEAD_INDEX = "http://127.0.0.1:9/simple"


class EngineScreenshots:
    """Steps chained with timers so that QGIS keeps drawing between them."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.iface = qgis.utils.iface
        self.seen: dict[str, object] = {"executable": sys.executable, "scenario": scenario}
        self.plugin = None
        self.dialog = None
        self.started = time.monotonic()

    def start(self) -> None:
        self.iface.mainWindow().showMaximized()
        if not (qgis.utils.loadPlugin(PLUGIN) and qgis.utils.startPlugin(PLUGIN)):
            return self.finish(f"The plugin {PLUGIN} could not be started: is it on QGIS_PLUGINPATH?")
        self.plugin = qgis.utils.plugins[PLUGIN]
        self.plugin.setup_action.trigger()
        self.dialog = self.plugin.setup_dialog
        self.dialog.resize(DIALOG)
        self.seen["made_from"] = self.dialog.base_label.text()
        self.seen["gpu_line"] = self.dialog.gpu_label.text()
        if self.scenario == "upgrade":
            return self.after(1000, self.reused)
        self.dialog.torch_index.setText("")  # torch 2.13.0 CPU lies on this machine's disk, found by pip.conf
        self.dialog.install_button.click()
        self.wait(lambda: not self.dialog.running, self.installed, "the install")

    def installed(self) -> None:
        self.seen["install_status"] = self.dialog.status_label.text()
        self.seen["engine_in_use"] = self.dialog.engine_label.text()
        self.seen["install_seconds"] = round(time.monotonic() - self.started, 1)
        self.grab(self.dialog, "engine-ready.png")
        if not self.dialog.status_label.text().startswith("The engine is ready"):
            return self.finish("The install failed.")
        self.dialog.hide()
        layer = QgsRasterLayer(str(SAMPLE), SAMPLE.stem)
        QgsProject.instance().addMapLayer(layer)
        self.plugin.action.trigger()
        panel = self.plugin.dock.run_panel
        panel.layer_combo.setLayer(layer)
        panel.model_combo.setCurrentIndex(panel.model_combo.findData("small"))
        panel.extent_combo.setCurrentIndex(panel.extent_combo.findData("layer"))
        panel.allow_untrained.setChecked(True)
        panel.output_widget.setFilePath(os.environ["TREESEG_RUN_OUTPUT"])
        self.wait(lambda: panel.engine_label.text().startswith(("Engine: CPU", "Engine not usable")), self.run,
                  "the engine probe")

    def run(self) -> None:
        panel = self.plugin.dock.run_panel
        self.seen["dock_engine"] = panel.engine_label.text()
        self.seen["run_enabled"] = panel.run_button.isEnabled()
        panel.run_button.click()
        self.wait(lambda: panel.task is None, self.ran, "the run")

    def ran(self) -> None:
        self.seen["run_stage"] = self.plugin.dock.run_panel.stage_label.text()
        self.seen["layers"] = sorted(layer.name() for layer in QgsProject.instance().mapLayers().values())
        self.after(2000, lambda: self.grab(self.iface.mainWindow(), "engine-run.png", self.cancel_repair))

    def cancel_repair(self) -> None:
        self.dialog.show()
        self.dialog.repair_button.click()
        self.wait(lambda: re.search(r"pip: ([3-9]|\d\d+) packages", self.dialog.status_label.text())
                  or not self.dialog.running, self.cancel_now, "pip's third package")

    def cancel_now(self) -> None:
        self.seen["cancelled_during"] = self.dialog.status_label.text()
        self.dialog.cancel_button.click()
        self.wait(lambda: not self.dialog.running, self.cancelled, "the cancel")

    def cancelled(self) -> None:
        self.seen["cancel_status"] = self.dialog.status_label.text()
        self.seen["engine_after_cancel"] = self.dialog.engine_label.text()
        self.grab(self.dialog, "engine-cancelled.png")
        os.environ.update(PIP_INDEX_URL=DEAD_INDEX, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
        self.dead_started = time.monotonic()
        self.dialog.repair_button.click()
        self.wait(lambda: not self.dialog.running, self.dead_index_failed, "the dead index")

    def dead_index_failed(self) -> None:
        self.seen["dead_index_seconds"] = round(time.monotonic() - self.dead_started, 1)
        self.seen["dead_index_status"] = self.dialog.status_label.text()
        self.seen["engine_after_dead_index"] = self.dialog.engine_label.text()
        self.grab(self.dialog, "engine-dead-index.png")
        self.finish()

    def reused(self) -> None:
        self.seen["folder"] = self.dialog.folder_label.text()
        self.seen["engine_in_use"] = self.dialog.engine_label.text()
        self.seen["install_enabled"] = self.dialog.install_button.isEnabled()
        self.seen["log"] = self.dialog.log.toPlainText()
        self.grab(self.dialog, "engine-reused.png")
        self.finish()

    def grab(self, widget, name: str, then: Callable[[], None] | None = None) -> None:
        QgsApplication.processEvents()
        widget.grab().save(str(IMAGES / name))
        self.seen.setdefault("images", []).append(name)
        if then is not None:
            QTimer.singleShot(0, then)

    def after(self, milliseconds: int, then: Callable[[], None]) -> None:
        QTimer.singleShot(milliseconds, then)

    def wait(self, condition: Callable[[], bool], then: Callable[[], None], what: str,
             since: float | None = None) -> None:
        """Call `then` once `condition()` holds, polling while QGIS keeps running; give up after the timeout."""
        since = time.monotonic() if since is None else since
        if condition():
            QTimer.singleShot(0, then)
        elif time.monotonic() - since > TIMEOUT_S:
            self.finish(f"{what} did not finish in {TIMEOUT_S} s")
        else:
            QTimer.singleShot(POLL_MS, lambda: self.wait(condition, then, what, since))

    def finish(self, problem: str = "") -> None:
        self.seen["problem"] = problem
        Path(os.environ["TREESEG_OUT"]).write_text(json.dumps(self.seen, indent=1), encoding="utf-8")
        QgsApplication.exit(1 if problem else 0)


shots = EngineScreenshots(os.environ.get("TREESEG_SCENARIO", "build"))
QTimer.singleShot(1000, shots.start)
