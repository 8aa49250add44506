"""The Qt6 gate: finds PyQt5-only idioms that QGIS 4 (Qt6, PyQt6) no longer accepts.

Checks every Python file given (folders recursively):
- unscoped enum values on Qt and QGIS classes (`Qt.AlignLeft` instead of `Qt.AlignmentFlag.AlignLeft`),
  found by resolving each `Class.Name` through the real Qt/QGIS modules;
- unscoped enum values reached through an instance (`dialog.Accepted`, `self.Accepted`): a capitalised
  attribute of a lower-case name that is an unscoped enum value of a Qt/QGIS class the file imports;
- Qt classes imported from QtWidgets that Qt6 has in QtGui only (QAction, QActionGroup, QShortcut…: take them
  from compat.py);
- `exec_`, `QRegExp`/`QRegExpValidator`, any `PyQt5` import, `QVariant.<Type>` and comparisons with `QVariant`.

`qt_references` lists every Qt name the files import through qgis.PyQt and every attribute chain rooted at
one; tests/test_qt6_real.py resolves them under real PyQt6 the way QGIS 4's qgis.PyQt shim exposes them.

Run: `python scripts/qt6_gate.py treeseg_qgis tests scripts` (exit status 1 and one line per finding).
"""

from __future__ import annotations

import ast
import enum
import importlib
import sys
from pathlib import Path
from typing import Any

REMOVED_NAMES = {"QRegExp", "QRegExpValidator"}
MOVED_TO_QTGUI = {"QAction", "QActionGroup", "QShortcut", "QUndoCommand", "QUndoGroup", "QUndoStack",
                  "QFileSystemModel"}
UNRESOLVED = object()
_UNSCOPED: dict[type, dict[str, str]] = {}


def is_enum_type(value: Any) -> bool:
    """Whether `value` is an enum class: a Python enum or a sip (PyQt5) enum."""
    return isinstance(value, type) and (issubclass(value, enum.Enum) or type(value).__name__ == "enumtype")


def imported_names(tree: ast.Module) -> dict[str, Any]:
    """The objects that a file's imports of `qgis` modules (qgis.PyQt, qgis.core, …) bind."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != "qgis":
                        continue
                    if alias.asname:
                        names[alias.asname] = importlib.import_module(alias.name)
                    else:
                        top = alias.name.split(".")[0]
                        importlib.import_module(alias.name)
                        names[top] = importlib.import_module(top)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "qgis" and not node.level:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if hasattr(module, alias.name):
                        names[alias.asname or alias.name] = getattr(module, alias.name)
        except Exception:  # a module that does not import here (Windows-only, optional): nothing to resolve
            continue
    return names


def resolve(node: ast.expr, names: dict[str, Any]) -> Any:
    """The object a `Name` or dotted `Attribute` stands for, or UNRESOLVED."""
    if isinstance(node, ast.Name):
        return names.get(node.id, UNRESOLVED)
    if isinstance(node, ast.Attribute):
        owner = resolve(node.value, names)
        return UNRESOLVED if owner is UNRESOLVED else getattr(owner, node.attr, UNRESOLVED)
    return UNRESOLVED


def unscoped_values(owner: type) -> dict[str, str]:
    """The unscoped enum values that `owner` carries, each with its scoped spelling (cached per class)."""
    if owner not in _UNSCOPED:
        values = {}
        for name in dir(owner):
            if name[:1].isupper():
                value = getattr(owner, name, None)
                if is_enum_type(type(value)) and not is_enum_type(value):
                    values[name] = f"{owner.__name__}.{type(value).__name__}.{name}"
        _UNSCOPED[owner] = values
    return _UNSCOPED[owner]


def root_name(node: ast.expr) -> str | None:
    """The name a dotted expression starts from (`self` for `self.box.Accepted`), or None."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def qt_references(path: Path) -> list[tuple[str, str, str]]:
    """(where, module, dotted name) for every Qt name `path` imports through qgis.PyQt (module 'QtCore'…,
    or 'sip') and every attribute chain rooted at one (`Qt.AlignmentFlag.AlignLeft`); a Qt class that
    compat.qt_moved_to_gui takes counts as QtGui's."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: dict[str, str] = {}
    references = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qgis.PyQt"):
            for alias in node.names:
                module, name = ((node.module.split(".")[2], alias.name) if node.module != "qgis.PyQt"
                                else (alias.name, ""))
                modules[alias.asname or alias.name] = module if not name else f"{module}:{name}"
                references.append((where, module, name))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "qt_moved_to_gui"
              and node.args and isinstance(node.args[0], ast.Constant)):
            references.append((where, "QtGui", str(node.args[0].value)))
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = []
            current: ast.expr = node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id in modules:
                module, _, name = modules[current.id].partition(":")
                chain = ".".join([name, *reversed(parts)] if name else reversed(parts))
                references.append((f"{path}:{node.lineno}", module, chain))
    return references


def mentions(node: ast.AST, name: str) -> bool:
    """Whether `name` appears as a name or attribute anywhere in `node`."""
    return any((isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.Attribute) and n.attr == name)
               for n in ast.walk(node))


def file_findings(path: Path) -> list[str]:
    """One line per PyQt5-only idiom in the file at `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = imported_names(tree)
    imported_classes = [value for value in names.values() if isinstance(value, type) and not is_enum_type(value)]
    bound = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    found = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: PyQt5 import '{m}' (import from qgis.PyQt)" for m in modules
                      if m.split(".")[0] == "PyQt5"]
            if isinstance(node, ast.ImportFrom):
                found += [f"{where}: {a.name} is gone in Qt6 (use QRegularExpression)" for a in node.names
                          if a.name in REMOVED_NAMES]
                if (node.module or "").endswith("QtWidgets"):
                    found += [f"{where}: {a.name} is in QtGui under Qt6, not QtWidgets (use compat.qt_moved_to_gui)"
                              for a in node.names if a.name in MOVED_TO_QTGUI]
        elif isinstance(node, ast.Attribute) and node.attr == "exec_":
            found.append(f"{where}: exec_() is gone in PyQt6 (use exec())")
        elif isinstance(node, ast.Name) and node.id in REMOVED_NAMES and isinstance(node.ctx, ast.Load):
            found.append(f"{where}: {node.id} is gone in Qt6 (use QRegularExpression)")
        elif isinstance(node, ast.Compare) and mentions(node, "QVariant"):
            found.append(f"{where}: comparison with QVariant (PyQt6 has no QVariant types; compare QMetaType)")
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value, names)
            if getattr(owner, "__name__", "") == "QVariant" and node.attr[:1].isupper():
                found.append(f"{where}: QVariant.{node.attr}: PyQt6 has no QVariant types (use QMetaType.Type)")
            elif isinstance(owner, type) and not is_enum_type(owner):
                value = getattr(owner, node.attr, UNRESOLVED)
                if value is not UNRESOLVED and is_enum_type(type(value)):
                    scoped = f"{type(value).__qualname__}.{node.attr}"
                    found.append(f"{where}: unscoped enum {owner.__name__}.{node.attr} (write {scoped})")
            elif (owner is UNRESOLVED and node.attr[:1].isupper() and root_name(node.value) not in bound
                  and (root_name(node.value) or "A")[:1].islower()
                  and not (isinstance(node.value, ast.Attribute) and node.value.attr[:1].isupper())):
                scoped = next((unscoped_values(c)[node.attr] for c in imported_classes
                               if node.attr in unscoped_values(c)), None)
                if scoped:
                    found.append(f"{where}: unscoped enum {node.attr} reached through an instance (write {scoped})")
    return found


def python_files(paths: list[Path]) -> list[Path]:
    """The .py files in `paths`, folders searched recursively; a path that does not exist is an error."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"qt6 gate: no such file or folder: {', '.join(missing)}")
    return sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py")))


def findings(paths: list[Path]) -> list[str]:
    """Every PyQt5-only idiom in the Python files under `paths`."""
    return [line for path in python_files(paths) for line in file_findings(path)]


def main(arguments: list[str]) -> int:
    """Print the findings under the given paths; 1 when there are any, 2 without paths or with a missing one."""
    try:
        if not arguments:
            raise FileNotFoundError("usage: python scripts/qt6_gate.py PATH [PATH...]")
        lines = findings([Path(a) for a in arguments])
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print("\n".join(lines) if lines else "qt6 gate: no PyQt5-only idioms")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
