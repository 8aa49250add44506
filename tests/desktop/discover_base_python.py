"""Run by `qgis.bin --code` (tests/test_engine_desktop.py): engine discovery inside the real QGIS, written as JSON."""

import json
import os
import sys

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QTimer


def discover() -> None:
    sys.path.insert(0, os.environ["TREESEG_REPO"])
    from treeseg_qgis.qgis_side import engine_env

    found = {"executable": sys.executable, "base_prefix": sys.base_prefix, "qgis_prefix": QgsApplication.prefixPath(),
             "candidates": [str(path) for path in engine_env.base_python_candidates()]}
    try:
        found["chosen"] = engine_env.find_base_python()
    except engine_env.EngineEnvError as error:
        found["error"] = str(error)
    with open(os.environ["TREESEG_OUT"], "w", encoding="utf-8") as file:
        json.dump(found, file)
    QgsApplication.exit(0)


QTimer.singleShot(0, discover)
