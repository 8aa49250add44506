"""The process boundary, checked on the source: what each part of the package may import.

- `engine/core` runs without QGIS, GDAL or Qt;
- `qgis_side` runs inside QGIS and never imports torch or the engine (bar the torch-free evaluation);
- the shared modules at the top (parameters, protocol, catalogue, memory, outputs, locks) are standard
  library only, so both sides can use them.

Relative imports are resolved to the modules they name, so `from ..x import y` is checked like
`from treeseg_qgis.x import y`.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "treeseg_qgis"
QGIS_GDAL_QT = ("qgis", "osgeo", "PyQt5", "PyQt6", "PySide2", "PySide6", "sip")
ENGINE_LIBRARIES = ("torch", "transformers", "sklearn", "scipy", "skimage", "numpy", "dask", "distributed")
SHARED = ("atomic", "catalogue", "locks", "memory", "outputs", "params", "protocol")
# Evaluation needs numpy, scipy and GDAL, not torch: the Processing algorithm runs it inside QGIS.
QGIS_SIDE_MAY_CALL = ("treeseg_qgis.engine.evaluate", "treeseg_qgis.engine.core.errors")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything `path` imports, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            modules.add(module)
            modules.update(f"{module}.{alias.name}" for alias in node.names
                           if (PACKAGE.parent / (f"{module}.{alias.name}".replace(".", "/") + ".py")).exists())
    return modules


def offenders(folder: Path, forbidden) -> list[str]:
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder]
    assert files, folder
    return sorted(f"{path.relative_to(PACKAGE)}: {module}"
                  for path in files for module in imported_modules(path) if forbidden(module))


def test_the_engine_core_imports_no_qgis_gdal_or_qt():
    assert len(list((PACKAGE / "engine" / "core").glob("*.py"))) >= 8
    found = offenders(PACKAGE / "engine" / "core",
                      lambda m: m.split(".")[0] in QGIS_GDAL_QT or m.startswith(("treeseg_qgis.engine.gis",
                                                                                   "treeseg_qgis.qgis_side")))
    assert not found, f"the core must stay QGIS-free, found {found}"


def test_the_engine_never_imports_the_qgis_side():
    found = offenders(PACKAGE / "engine",
                      lambda m: m.split(".")[0] in ("qgis", "PyQt5", "PyQt6") or m.startswith("treeseg_qgis.qgis_side"))
    assert not found, f"the engine must run without QGIS, found {found}"


def test_the_qgis_side_never_imports_torch_or_the_engine():
    def forbidden(module: str) -> bool:
        if module.startswith(QGIS_SIDE_MAY_CALL):
            return False
        return module.split(".")[0] in ENGINE_LIBRARIES[:5] or module.startswith("treeseg_qgis.engine")
    found = offenders(PACKAGE / "qgis_side", forbidden)
    assert not found, f"the QGIS side must not load the engine, found {found}"


def test_the_shared_modules_are_standard_library_only():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name in SHARED:
        path = PACKAGE / f"{name}.py"
        if not path.exists():
            continue
        found = [m for m in imported_modules(path)
                 if not (m.split(".")[0] in stdlib or m == "treeseg_qgis"
                         or m.removeprefix("treeseg_qgis.").split(".")[0] in SHARED)]
        assert not found, f"{name}.py must be standard library only, found {found}"


def test_the_check_resolves_relative_imports(tmp_path):
    sample = PACKAGE / "engine" / "core" / "_boundary_sample.py"
    sample.write_text("import numpy\nfrom ...qgis_side import results\nfrom qgis.core import QgsProject\n")
    try:
        modules = imported_modules(sample)
        assert {"qgis.core", "treeseg_qgis.qgis_side", "treeseg_qgis.qgis_side.results"} <= modules
        assert offenders(sample, lambda m: m.startswith("treeseg_qgis.qgis_side"))
    finally:
        sample.unlink()
