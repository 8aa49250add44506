"""The engine (treeseg_qgis/core) must run without QGIS, GDAL or Qt."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "treeseg_qgis" / "core"
FORBIDDEN = ("qgis", "osgeo", "gdal", "PyQt5", "PyQt6", "PySide2", "PySide6", "sip")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_core_imports_no_qgis_gdal_or_qt():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 8
    offenders = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN
    }
    assert not offenders, f"core must stay QGIS-free, found {sorted(offenders)}"


def test_the_check_detects_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy\nfrom qgis.core import QgsProject\n")
    assert "qgis.core" in imported_modules(sample)
