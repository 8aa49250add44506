"""QGIS 4 is Qt6-only and cannot run here, so the plugin's Qt side is checked under real PyQt6 (the wheel in
.venv-qt6, made by `make setup`): every Qt name qgis_side imports through qgis.PyQt, and every attribute chain
rooted at one, resolves the way QGIS 4's shim exposes it, and the Qt-only layout helpers build real widgets.

QGIS 4's shim (python/PyQt/PyQt6/Qt*.py and sip.py in QGIS's repository) makes `qgis.PyQt.<Module>` a star
import of `PyQt6.<Module>` (QtCore adds QVariant helpers and NULL, QtWidgets adds QLayout.setMargin), so
QtWidgets has no QAction there: Qt6 moved it to QtGui."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("qt6_gate", REPO / "scripts" / "qt6_gate.py")
qt6_gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qt6_gate)

QT6_PYTHON = REPO / ".venv-qt6" / "bin" / "python"

# Runs under PyQt6: resolves [module, dotted name] pairs as QGIS 4's qgis.PyQt.<module> (= PyQt6.<module>)
# exposes them and prints the ones that do not resolve.
RESOLVE = """
import importlib, json, sys
unresolved = []
for module, dotted in json.load(sys.stdin):
    value = importlib.import_module(f"PyQt6.{module}")
    for part in filter(None, dotted.split(".")):
        if not hasattr(value, part):
            unresolved.append([module, dotted])
            break
        value = getattr(value, part)
print(json.dumps(unresolved))
"""

# Runs under PyQt6 with a qgis.PyQt package that re-exports PyQt6 as QGIS 4's does: builds a widget with the
# plugin's own layout helpers (gui/layouts.py) offscreen and prints what the layouts hold.
BUILD_LAYOUTS = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from PyQt6.QtWidgets import QApplication, QLabel, QPushButton, QWidget
from treeseg_qgis.qgis_side.gui.layouts import hbox, vbox
app = QApplication([])
window = QWidget()
row = hbox(QLabel("Model"), (QPushButton("Run"), 2), 1)
window.setLayout(vbox(row, QLabel("Ready")))
window.show()
app.processEvents()
print(json.dumps({"rows": window.layout().count(), "row_items": row.count(), "stretch": row.stretch(1),
                  "visible": window.isVisible(), "qt": sys.modules["PyQt6.QtCore"].QT_VERSION_STR}))
"""


def qt6_python() -> str:
    """The PyQt6 venv's Python; skipped only inside a QGIS root (its Python cannot run the host's venv)."""
    runs = QT6_PYTHON.exists() and subprocess.run([str(QT6_PYTHON), "-c", "import PyQt6.QtWidgets"],
                                                  capture_output=True, timeout=120).returncode == 0
    if not runs and os.environ.get("TREESEG_QGIS_ROOT_VERSION"):
        pytest.skip("real PyQt6 runs in the system suite (.venv-qt6 is the host's venv)")
    assert runs, f"{QT6_PYTHON} cannot import PyQt6: run `make setup`"
    return str(QT6_PYTHON)


def unresolved_under_pyqt6(references: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The references (where, module, dotted name) that real PyQt6 does not have."""
    pairs = sorted({(module, dotted) for _, module, dotted in references})
    run = subprocess.run([qt6_python(), "-c", RESOLVE], input=json.dumps(pairs), capture_output=True, text=True,
                         timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0, run.stderr
    missing = {tuple(pair) for pair in json.loads(run.stdout)}
    return [reference for reference in references if reference[1:] in missing]


def references_in(source: str, tmp_path: Path) -> list[tuple[str, str, str]]:
    path = tmp_path / "snippet.py"
    path.write_text(source, encoding="utf-8")
    return qt6_gate.qt_references(path)


def test_every_qt_name_and_chain_the_plugin_uses_resolves_under_real_pyqt6():
    references = [r for f in qt6_gate.python_files([REPO / "treeseg_qgis" / "qgis_side"])
                  for r in qt6_gate.qt_references(f)]
    modules = {module for _, module, _ in references}
    assert {"QtCore", "QtGui", "QtWidgets", "sip"} <= modules
    assert ("QtGui", "QAction") in {r[1:] for r in references}  # compat.qt_moved_to_gui("QAction")
    assert len({r[1:] for r in references}) > 60
    assert unresolved_under_pyqt6(references) == []


@pytest.mark.parametrize(("source", "missing"), [
    ("from qgis.PyQt.QtWidgets import QAction\n", ("QtWidgets", "QAction")),
    ("from qgis.PyQt.QtCore import Qt\nALIGN = Qt.AlignLeft\n", ("QtCore", "Qt.AlignLeft")),
    ("from qgis.PyQt.QtWidgets import QMessageBox\nBUTTON = QMessageBox.Yes\n", ("QtWidgets", "QMessageBox.Yes")),
    ("from qgis.PyQt.QtCore import QRegExp\n", ("QtCore", "QRegExp")),
])
def test_a_name_pyqt6_lacks_is_reported(tmp_path, source, missing):
    assert [r[1:] for r in unresolved_under_pyqt6(references_in(source, tmp_path))] == [missing]


def test_the_layout_helpers_build_real_qt6_widgets_offscreen(tmp_path):
    shim = tmp_path / "shim" / "qgis" / "PyQt"
    shim.mkdir(parents=True)
    (shim.parent / "__init__.py").write_text("", encoding="utf-8")
    (shim / "__init__.py").write_text("", encoding="utf-8")
    for module in ("QtCore", "QtGui", "QtWidgets"):
        (shim / f"{module}.py").write_text(f"from PyQt6.{module} import *  # noqa: F403\n", encoding="utf-8")
    run = subprocess.run([qt6_python(), "-c", BUILD_LAYOUTS, str(tmp_path / "shim"), str(REPO)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0, run.stderr
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert built["qt"].startswith("6.")
    assert (built["rows"], built["row_items"], built["stretch"], built["visible"]) == (2, 3, 2, True)
