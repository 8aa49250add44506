"""Run by `qgis.bin --code` (tests/test_engine_desktop.py): the engine set-up dialog inside the real QGIS window,
Install clicked with the indexes the environment names; what the user meets first (a question or the status line's
message) and the seconds it took are written as JSON. A question is answered Stop."""

import json
import os
import sys
import time
from pathlib import Path

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication, QMessageBox
from qgis.utils import iface

LIMIT_SECONDS = 400
seen = {}


def start() -> None:
    sys.path.insert(0, os.environ["TREESEG_REPO"])
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    dialog = EngineSetupDialog(Path(os.environ["TREESEG_ENGINES"]), iface.mainWindow())
    if "TREESEG_TORCH_INDEX" in os.environ:
        dialog.torch_index.setText(os.environ["TREESEG_TORCH_INDEX"])
    dialog.show()
    started = time.monotonic()
    dialog.install_button.click()

    def look() -> None:
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox) and "question" not in seen:
            seen.update(question=box.text(), seconds=round(time.monotonic() - started, 1))
            next(button for button in box.buttons() if button.text() == "Stop").click()
        if not dialog.running or time.monotonic() - started > LIMIT_SECONDS:
            seen.setdefault("seconds", round(time.monotonic() - started, 1))
            seen.update(status=dialog.status_label.text(), log=dialog.log.toPlainText()[-3000:],
                        running=dialog.running)
            with open(os.environ["TREESEG_OUT"], "w", encoding="utf-8") as file:
                json.dump(seen, file)
            QgsApplication.exit(0)
            return
        QTimer.singleShot(100, look)

    QTimer.singleShot(100, look)


QTimer.singleShot(0, start)
