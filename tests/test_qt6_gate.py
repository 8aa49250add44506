"""The Qt6 gate (scripts/qt6_gate.py): the plugin, its tests and scripts hold no PyQt5-only idiom,
and each idiom QGIS 4 (PyQt6) rejects is caught."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

GATE_SCRIPT = REPO / "scripts" / "qt6_gate.py"
_spec = importlib.util.spec_from_file_location("qt6_gate", GATE_SCRIPT)
qt6_gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qt6_gate)


def gate_findings(tmp_path: Path, source: str) -> list[str]:
    """The gate's findings on one file holding `source`."""
    path = tmp_path / "snippet.py"
    path.write_text(source, encoding="utf-8")
    return qt6_gate.findings([path])


def test_the_plugin_tests_and_scripts_hold_no_pyqt5_only_idiom():
    assert qt6_gate.findings([REPO / "treeseg_qgis", REPO / "tests", REPO / "scripts"]) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from qgis.PyQt.QtCore import Qt\nALIGN = Qt.AlignLeft\n", "unscoped enum Qt.AlignLeft"),
    ("from qgis.PyQt.QtWidgets import QMessageBox\nBUTTON = QMessageBox.Yes\n", "unscoped enum QMessageBox.Yes"),
    ("from qgis.core import QgsTask\nFLAGS = QgsTask.CanCancel\n", "unscoped enum QgsTask.CanCancel"),
    ("import qgis.core\nLEVEL = qgis.core.Qgis.Critical\n", "unscoped enum Qgis.Critical"),
    ("def show(dialog):\n    return dialog.exec_()\n", "exec_() is gone"),
    ("from qgis.PyQt.QtCore import QRegExp\n", "QRegExp is gone"),
    ("from PyQt5.QtCore import Qt\n", "PyQt5 import 'PyQt5.QtCore'"),
    ("import PyQt5.QtWidgets\n", "PyQt5 import 'PyQt5.QtWidgets'"),
    ("from qgis.PyQt.QtCore import QVariant\ndef empty(v):\n    return v == QVariant()\n", "comparison with QVariant"),
    ("from qgis.PyQt.QtCore import QVariant\nKIND = QVariant.Int\n", "QVariant.Int: PyQt6 has no QVariant types"),
    ("from qgis.PyQt.QtWidgets import QAction\n", "QAction is in QtGui under Qt6, not QtWidgets"),
    ("from qgis.PyQt.QtWidgets import QDialog\ndef done(dialog):\n    return dialog.result() == dialog.Accepted\n",
     "unscoped enum Accepted reached through an instance (write QDialog.DialogCode.Accepted)"),
    ("from qgis.PyQt.QtWidgets import QMessageBox\nclass Ask(QMessageBox):\n    def yes(self):\n"
     "        return self.Yes\n",
     "unscoped enum Yes reached through an instance (write QMessageBox.StandardButton.Yes)"),
])
def test_each_pyqt5_only_idiom_is_found(tmp_path, source, expected):
    found = gate_findings(tmp_path, source)
    assert len(found) == 1 and expected in found[0] and found[0].startswith(f"{tmp_path / 'snippet.py'}:")


def test_scoped_enums_and_qt6_spellings_pass(tmp_path):
    source = (
        "from qgis.core import Qgis, QgsTask\n"
        "from qgis.PyQt.QtCore import QRegularExpression, Qt\n"
        "from qgis.PyQt.QtWidgets import QMessageBox\n"
        "ALIGN = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop\n"
        "BUTTON = QMessageBox.StandardButton.Yes\n"
        "FLAGS = QgsTask.Flag.CanCancel\n"
        "LEVEL = Qgis.MessageLevel.Critical\n"
        "PATTERN = QRegularExpression('[0-9]+')\n"
        "def show(dialog):\n    return dialog.exec()\n"
        "def accepted(dialog, color):\n"
        "    return dialog.result() == dialog.DialogCode.Accepted and color.name(color.NameFormat.HexArgb)\n"
        "from osgeo import gdal\nOPEN = gdal.Open\n"
    )
    assert gate_findings(tmp_path, source) == []


def test_a_path_that_does_not_exist_is_an_error_not_a_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        qt6_gate.findings([tmp_path / "missing"])


def test_an_unscoped_enum_added_to_a_scratch_copy_fails_the_gate(tmp_path):
    copy = tmp_path / "treeseg_qgis"
    shutil.copytree(REPO / "treeseg_qgis", copy, ignore=shutil.ignore_patterns("__pycache__"))
    panel = copy / "qgis_side" / "gui" / "run_panel.py"
    panel.write_text(panel.read_text(encoding="utf-8") + "\nSCRATCH_ALIGNMENT = Qt.AlignRight\n", encoding="utf-8")
    clean = subprocess.run([sys.executable, str(GATE_SCRIPT), str(REPO / "treeseg_qgis")],
                           capture_output=True, text=True, timeout=120)
    broken = subprocess.run([sys.executable, str(GATE_SCRIPT), str(copy)], capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert broken.returncode == 1
    assert broken.stdout.strip().splitlines() == [
        f"{panel}:{len(panel.read_text(encoding='utf-8').splitlines())}: unscoped enum Qt.AlignRight "
        "(write Qt.AlignmentFlag.AlignRight)"]
