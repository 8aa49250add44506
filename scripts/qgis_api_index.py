"""The QGIS API the plugin names, and a compact index of a QGIS release's Python API to check it against.

`plugin_names` walks the plugin's QGIS side (AST) for every QGIS class it imports from qgis.core, qgis.gui
or qgis.analysis, every attribute chain rooted at one (`Qgis.MessageLevel.Critical`, `QgsProject.instance`),
every camelCase method a subclass of a QGIS class overrides or calls on `self`/`super()` (a renamed virtual
is never called, silently), and the current paths handed to `compat.qgis_enum`.

`build` derives the index from QGIS's bindings text, `python/PyQt6/{core,gui,analysis}/auto_generated/**/*.sip.in`
(the Qt6 bindings QGIS 4 is built from), read from a QGIS git directory at a release tag (`git ls-tree`,
`git show TAG:path`) or from a folder: per class its bases, members (methods, attributes, nested classes),
signals, enums with their values, the members marked deprecated and those marked /NonVirtual/ (QGIS no longer
calls a Python override of them); written as gzipped JSON with the tag and commit it came from. A folder may hold
a PROVENANCE.json (repository, tag, commit, the files read and their commits, and `listed` files whose classes are
known to exist but whose members were not read): then the index records it, and members of listed classes are
reported as unchecked rather than missing. tests/data/qgis4_bindings is such a folder (see its PROVENANCE.json).

    python scripts/qgis_api_index.py build --git /path/to/QGIS.git --tag final-4_0_2 --out tests/data/qgis4_api.json.gz
    python scripts/qgis_api_index.py build --folder tests/data/qgis4_bindings --out tests/data/qgis4_api.json.gz
    python scripts/qgis_api_index.py check tests/data/qgis4_api.json.gz   # exit 1 and one line per name it lacks
    python scripts/qgis_api_index.py live   # the same against the QGIS this Python imports (with its deprecations)

`missing` and `deprecated` compare the plugin's names with an index; `missing_live` with the QGIS that runs.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

QGIS_MODULES = ("qgis.core", "qgis.gui", "qgis.analysis")
SIP_FOLDERS = tuple(f"python/PyQt6/{part}/auto_generated" for part in ("core", "gui", "analysis"))
PLUGIN_SIDE = Path(__file__).resolve().parents[1] / "treeseg_qgis" / "qgis_side"
CAMEL_CASE = re.compile(r"^[a-z]+[A-Z]\w*$")

Names = dict[tuple[str, str], list[str]]


# ---- the names the plugin uses ----

def _chain(node: ast.expr) -> tuple[str | None, list[str]]:
    """The root name and the attribute parts of a dotted expression (`a.b.c` → ('a', ['b', 'c']))."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), list(reversed(parts))


def qgis_bases(paths: Iterable[Path]) -> dict[str, str]:
    """The QGIS class each class defined in `paths` derives from, directly or through the plugin's own classes
    (EngineAlgorithm → QgsProcessingAlgorithm, so SegmentTrees → QgsProcessingAlgorithm as well)."""
    direct: dict[str, list[str]] = {}
    imported: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in QGIS_MODULES:
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ClassDef):
                direct[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
    bases: dict[str, str] = {}
    for _ in range(len(direct)):
        for name, parents in direct.items():
            found = next((p if p in imported else bases.get(p) for p in parents if p in imported or p in bases), None)
            if found and name not in imported:
                bases[name] = found
    return bases


def file_names(path: Path, bases_of: dict[str, str] | None = None) -> Names:
    """(class, dotted member or '') → where, for every QGIS name the file at `path` uses (see the module doc);
    `bases_of` maps the plugin's own classes to the QGIS class they derive from (qgis_bases)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    classes: dict[str, str] = {}
    names: Names = {}

    def add(cls: str, member: str, node: ast.AST) -> None:
        names.setdefault((cls, member), []).append(f"{path}:{getattr(node, 'lineno', 0)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in QGIS_MODULES:
            for alias in node.names:
                classes[alias.asname or alias.name] = alias.name
                add(alias.name, "", node)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            root, parts = _chain(node)
            if root in classes:
                add(classes[root], ".".join(parts), node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "qgis_enum"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            cls, _, member = node.args[0].value.partition(".")
            add(cls, member, node)
        elif isinstance(node, ast.ClassDef):
            bases = [classes.get(b.id) or (bases_of or {}).get(b.id) for b in node.bases if isinstance(b, ast.Name)]
            bases = [b for b in bases if b]
            if not bases:
                continue
            own = {item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}
            for name in sorted(n for n in own if CAMEL_CASE.match(n)):
                add(bases[0], name, node)
            for inside in ast.walk(node):
                if not isinstance(inside, ast.Attribute) or not CAMEL_CASE.match(inside.attr):
                    continue
                on_self = isinstance(inside.value, ast.Name) and inside.value.id == "self" and inside.attr not in own
                on_super = (isinstance(inside.value, ast.Call) and isinstance(inside.value.func, ast.Name)
                            and inside.value.func.id == "super")
                if on_self or on_super:
                    add(bases[0], inside.attr, inside)
    return names


def plugin_names(paths: Iterable[Path] = (PLUGIN_SIDE,)) -> Names:
    """Every QGIS name the Python files under `paths` use, with where."""
    files = sorted(f for root in paths for f in ([root] if root.is_file() else root.rglob("*.py")))
    bases_of = qgis_bases(files)
    names: Names = {}
    for path in files:
        for key, where in file_names(path, bases_of).items():
            names.setdefault(key, []).extend(where)
    return names


# ---- the index, from the bindings text ----

BLOCK = re.compile(r"^\s*%(\w+)")
CLASS = re.compile(r"^\s*(?:class|struct)\s+(\w+)(?:\s*/[^/]*/)?\s*(?::\s*([^{/]+?))?\s*(?:/[^/]*/)?\s*{?\s*$")
ENUM = re.compile(r"^\s*enum\s+(?:class\s+)?(\w+)")
SECTION = re.compile(r"^\s*(public|protected|private|signals)(?:\s+slots)?\s*:")
METHOD = re.compile(r"(?:^|[\s*&:])(~?\w+)\s*\(")
ATTRIBUTE = re.compile(r"(\w+)\s*(?:/[^/]*/)?\s*;\s*$")
TYPEDEF = re.compile(r"^\s*typedef\s+.*?(\w+)\s*;")
SKIPPED_WORDS = {"operator", "return", "if", "sizeof", "SIP_PYOBJECT", "SIP_PYLIST", "SIP_PYDICT"}


def _class_entry(index: dict[str, Any], name: str, bases: str | None) -> dict[str, Any]:
    entry = index.setdefault(name, {"bases": [], "members": [], "signals": [], "enums": {}, "deprecated": [],
                                    "nonvirtual": []})
    if bases:
        entry["bases"] = [b.split()[-1].split("::")[-1] for b in bases.split(",") if b.strip()]
    return entry


def parse_sip(text: str, index: dict[str, Any]) -> None:
    """Add the classes declared in one .sip.in file's `text` to `index` (nested ones as Outer.Inner)."""
    stack: list[tuple[str, int]] = []  # (class name, brace depth of its body)
    depth, section, block, enum, last, pending = 0, "public", None, None, None, None
    for line in text.splitlines():
        if block:
            if line.strip() == "%End":
                block = None
            elif block == "Docstring" and ".. deprecated::" in line and last:
                last[0]["deprecated"].append(last[1])
            continue
        marker = BLOCK.match(line)
        if marker:
            block = None if marker.group(1) == "End" else marker.group(1)
            continue
        code = line.split("//", 1)[0]
        current = index[stack[-1][0]] if stack else None
        if enum is not None:
            values = [v.split("=")[0].split("/")[0].strip() for v in code.replace("{", "").replace("}", "").split(",")]
            enum.extend(v for v in values if re.fullmatch(r"\w+", v))
            if "}" in code:
                enum = None
        elif (match := CLASS.match(code)) and not code.rstrip().endswith(";"):
            outer = stack[-1][0] + "." if stack else ""
            if current is not None and section != "private":
                current["members"].append(match.group(1))
            _class_entry(index, outer + match.group(1), match.group(2))
            if "/Deprecated" in code and current is not None:
                current["deprecated"].append(match.group(1))
            pending = outer + match.group(1)
        elif (match := SECTION.match(code)) and current is not None:
            section = match.group(1)
        elif current is not None and section != "private" and (match := ENUM.match(code)):
            current["enums"][match.group(1)] = enum = []
            current["members"].append(match.group(1))
            last = (current, match.group(1))
            if "}" in code:
                enum.extend(v.split("=")[0].strip() for v in code.split("{", 1)[1].split("}")[0].split(","))
                enum = None
        elif current is not None and section != "private" and len(stack) and depth == stack[-1][1]:
            method = next((m for m in METHOD.findall(code) if m not in SKIPPED_WORDS), None)
            typedef = TYPEDEF.match(code)
            attribute = ATTRIBUTE.search(code) if "(" not in code and ")" not in code else None
            name = method or (typedef.group(1) if typedef else None) or (attribute.group(1) if attribute else None)
            if name and not name.startswith("~") and name != stack[-1][0].split(".")[-1]:
                current["signals" if section == "signals" else "members"].append(name)
                last = (current, name)
                if "/Deprecated" in code:
                    current["deprecated"].append(name)
                if "/NonVirtual" in code:
                    current["nonvirtual"].append(name)
        opened, closed = code.count("{"), code.count("}")
        if pending and opened:
            stack.append((pending, depth + 1))
            pending, section = None, "public"
        depth += opened - closed
        while stack and depth < stack[-1][1]:
            stack.pop()
            section = "public"


def tidy(index: dict[str, Any]) -> dict[str, Any]:
    """The index with sorted, de-duplicated lists (compact and stable in git)."""
    for entry in index.values():
        for key in ("members", "signals", "deprecated", "nonvirtual"):
            entry[key] = sorted(set(entry[key]))
    return dict(sorted(index.items()))


def git_sip_files(git_dir: Path, tag: str) -> Iterable[tuple[str, str]]:
    """(path, text) of every .sip.in under SIP_FOLDERS at `tag` in the git directory `git_dir`."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "--name-only", tag, *SIP_FOLDERS],
                             capture_output=True, text=True, check=True).stdout.split()
    for path in (p for p in listing if p.endswith(".sip.in")):
        yield path, subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{tag}:{path}"],
                                   capture_output=True, text=True, check=True).stdout


def folder_sip_files(folder: Path) -> Iterable[tuple[str, str]]:
    """(path, text) of every .sip.in under `folder`."""
    for path in sorted(folder.rglob("*.sip.in")):
        yield str(path.relative_to(folder)), path.read_text(encoding="utf-8")


def build(files: Iterable[tuple[str, str]], source: dict[str, Any],
          listed: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The index of the .sip.in `files`, with `source` (repository, tag, commit) recorded; `listed` maps a file
    path to {"commit", "classes"}: classes known to exist whose members were not read (marked "listed").
    `source["python_additions"]` maps a class to the members QGIS adds to it in Python ({"members": [...]})."""
    index: dict[str, Any] = {}
    count = 0
    for _, text in files:
        parse_sip(text, index)
        count += 1
    if not count:
        raise ValueError("no .sip.in files found: nothing to index")
    for path, entry in (listed or {}).items():
        for name in entry["classes"]:
            if name not in index:
                _class_entry(index, name, None)["listed"] = f"{path}@{entry['commit']}"
    for name, added in source.get("python_additions", {}).items():
        _class_entry(index, name, None)["members"].extend(added["members"])
    return {"source": {**source, "sip_files": str(count)}, "classes": tidy(index)}


def read_provenance(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(source, listed) from `folder`/PROVENANCE.json; a damaged file is refused in one line (ValueError)."""
    path = folder / "PROVENANCE.json"
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
        source = {key: provenance[key] for key in ("repository", "tag", "commit", "read_on", "how", "read")}
        source["not_found"] = provenance.get("not_found", {})
        source["python_additions"] = provenance.get("python_additions", {})
        listed = provenance["listed"]
        entries = [*listed.values(), *source["python_additions"].values()]
        if not all(isinstance(e.get("classes", e.get("members")), list) and isinstance(e.get("commit"), str)
                   for e in entries):
            raise ValueError
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{path} is not a provenance file (damaged or hand-edited)") from error
    return source, listed


def write_index(index: dict[str, Any], out: Path) -> None:
    """Write `index` as gzipped JSON to `out`, atomically (a temporary name, then a rename)."""
    partial = out.with_name(out.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8") as handle:
        json.dump(index, handle, separators=(",", ":"), sort_keys=True)
    partial.replace(out)


def read_index(path: Path) -> dict[str, Any]:
    """The index at `path`; a damaged or foreign file is refused in one line (ValueError)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            index = json.load(handle)
        if not isinstance(index, dict) or not isinstance(index.get("classes"), dict) or "tag" not in index["source"]:
            raise ValueError
    except (OSError, EOFError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path} is not a QGIS API index (damaged or hand-edited; rebuild it)") from error
    return index


# ---- comparing ----

def qt_has(cls: str, member: str) -> bool:
    """Whether the Qt class `cls` (outside the index: QObject, QDockWidget…) has `member` in the Qt here."""
    for module in ("QtCore", "QtGui", "QtWidgets"):
        qt = importlib.import_module(f"qgis.PyQt.{module}")
        if hasattr(getattr(qt, cls, None), member):
            return True
    return False


def _lookup(classes: dict[str, Any], cls: str, member: str, seen: set[str] | None = None) -> str | None:
    """Where `cls.member` is declared ('Class', 'Class (unscoped)' for an unscoped enum value, 'Qt' for a Qt
    base outside the index that has it), or None when neither the index nor a Qt base has it."""
    seen = seen or set()
    entry = classes.get(cls)
    if entry is None or cls in seen:
        return "Qt" if entry is None and not cls.startswith("Qgs") and qt_has(cls, member) else None
    seen.add(cls)
    if entry.get("listed"):
        return f"{cls} (listed)"
    if member in entry["members"] or member in entry["signals"]:
        return cls
    for values in entry["enums"].values():
        if member in values:  # an unscoped enum value: PyQt6 has it only through its enum
            return f"{cls} (unscoped)"
    return next((f for f in (_lookup(classes, base, member, seen) for base in entry["bases"]) if f), None)


def missing(names: Names, index: dict[str, Any]) -> list[str]:
    """One line per name the index lacks: an absent class, member, enum value, or an unscoped enum value."""
    classes, not_found, lines = index["classes"], index["source"].get("not_found", {}), []
    for (cls, dotted), where in sorted(names.items()):
        if cls in not_found:
            continue
        if cls not in classes:
            lines.append(f"{where[0]}: {cls} is not in QGIS {index['source']['tag']}")
            continue
        parts = [p for p in dotted.split(".") if p]
        if not parts:
            continue
        found = _lookup(classes, cls, parts[0])
        if found and found.endswith("(listed)"):
            continue
        if found is None or found.endswith("(unscoped)"):
            what = "an unscoped enum value" if found else "not there"
            lines.append(f"{where[0]}: {cls}.{parts[0]} is {what} in QGIS {index['source']['tag']}")
        elif len(parts) > 1 and found != "Qt":
            enums = classes[found]["enums"]
            nested = classes.get(f"{found}.{parts[0]}")
            known = enums.get(parts[0], []) + (nested["members"] + nested["signals"] if nested else [])
            if (parts[0] in enums or nested) and parts[1] not in known:
                lines.append(f"{where[0]}: {cls}.{parts[0]}.{parts[1]} is not in QGIS {index['source']['tag']}")
    return lines


def unchecked(names: Names, index: dict[str, Any]) -> list[str]:
    """One line per name the index cannot judge: a member of a class it only lists, or a class it records as not
    found in the bindings files (`not_found` in its source)."""
    classes, not_found, lines = index["classes"], index["source"].get("not_found", {}), []
    for (cls, dotted), where in sorted(names.items()):
        member = dotted.split(".")[0]
        owner = _lookup(classes, cls, member) if member and cls in classes else None
        if cls in not_found and not dotted:
            lines.append(f"{where[0]}: {cls} is unchecked ({not_found[cls]})")
        elif owner and owner.endswith("(listed)"):
            lines.append(f"{where[0]}: {cls}.{dotted} is unchecked (only the class is listed in the index)")
    return lines


def nonvirtual_overrides(names: Names, index: dict[str, Any]) -> list[str]:
    """One line per method the plugin defines in a subclass that the index marks /NonVirtual/: QGIS's C++ no
    longer calls such a Python override (it still runs when Python code calls it)."""
    classes, lines = index["classes"], []
    for (cls, dotted), where in sorted(names.items()):
        owner = _lookup(classes, cls, dotted) if dotted and "." not in dotted and cls in classes else None
        if owner and owner in classes and dotted in classes[owner].get("nonvirtual", []):
            lines.append(f"{where[0]}: {cls}.{dotted} is not virtual in QGIS {index['source']['tag']}: "
                         "an override of it is not called by QGIS")
    return lines


def deprecated(names: Names, index: dict[str, Any]) -> list[str]:
    """One line per name the plugin uses that the index marks deprecated."""
    classes, lines = index["classes"], []
    for (cls, dotted), where in sorted(names.items()):
        member = dotted.split(".")[0]
        owner = _lookup(classes, cls, member) if member else None
        if owner and owner in classes and member in classes[owner]["deprecated"]:
            lines.append(f"{where[0]}: {cls}.{member} is deprecated in QGIS {index['source']['tag']}")
    return lines


def missing_live(names: Names) -> list[str]:
    """One line per name the running QGIS lacks (compat's newer paths left out: compat falls back by design)."""
    modules = [importlib.import_module(m) for m in QGIS_MODULES]
    lines = []
    for (cls, dotted), where in sorted(names.items()):
        if all("compat.py" in w for w in where) and dotted:
            continue
        value = next((getattr(m, cls) for m in modules if hasattr(m, cls)), None)
        for part in [p for p in dotted.split(".") if p] if value is not None else []:
            value = getattr(value, part, None)
            if value is None:
                break
        if value is None:
            lines.append(f"{where[0]}: {cls}{'.' + dotted if dotted else ''} is not in this QGIS")
    return lines


def deprecated_live(names: Names) -> list[str]:
    """One line per member the plugin uses whose docstring in the running QGIS says it is deprecated (a class's
    own docstring lists every constructor, deprecated ones included, so classes are not judged by it)."""
    modules = [importlib.import_module(m) for m in QGIS_MODULES]
    lines = []
    for (cls, dotted), where in sorted(names.items()):
        if not dotted:
            continue
        value = next((getattr(m, cls) for m in modules if hasattr(m, cls)), None)
        for part in [p for p in dotted.split(".") if p] if value is not None else []:
            value = getattr(value, part, None)
        if value is not None and ".. deprecated::" in (getattr(value, "__doc__", None) or ""):
            lines.append(f"{where[0]}: {cls}{'.' + dotted if dotted else ''} is deprecated in this QGIS")
    return lines


def main(arguments: list[str]) -> int:
    """`build` an index or `check` the plugin against one (exit 1 with one line per missing name)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build")
    make.add_argument("--git", type=Path, help="a QGIS git directory (bare or .git)")
    make.add_argument("--tag", help="the release tag in --git, e.g. final-4_0_2")
    make.add_argument("--folder", type=Path,
                      help="or: a folder of .sip.in files, with a PROVENANCE.json or a --tag naming its release")
    make.add_argument("--out", type=Path, required=True)
    check = commands.add_parser("check")
    check.add_argument("index", type=Path)
    commands.add_parser("live", help="check the plugin against the QGIS this Python imports")
    options = parser.parse_args(arguments)
    if options.command == "live":
        names = plugin_names()
        lines = missing_live(names)
        print("\n".join(lines + deprecated_live(names)) or "every QGIS name the plugin uses is in this QGIS")
        return 1 if lines else 0
    try:
        if options.command == "build":
            with_provenance = bool(options.folder) and (options.folder / "PROVENANCE.json").exists()
            if not (options.tag or with_provenance) or not (options.git or options.folder):
                raise ValueError("build needs --git and --tag, or --folder (with a PROVENANCE.json or --tag)")
            listed = None
            if options.git:
                commit = subprocess.run(
                    ["git", "--git-dir", str(options.git), "rev-parse", f"{options.tag}^{{commit}}"],
                    capture_output=True, text=True, check=True).stdout.strip()
                source = {"repository": "qgis/QGIS", "tag": options.tag, "commit": commit}
                files = git_sip_files(options.git, options.tag)
            elif with_provenance:
                source, listed = read_provenance(options.folder)
                files = folder_sip_files(options.folder)
            else:
                source = {"repository": "qgis/QGIS", "tag": options.tag, "commit": ""}
                files = folder_sip_files(options.folder)
            index = build(files, source, listed)
            write_index(index, options.out)
            print(f"{options.out}: {len(index['classes'])} classes from {index['source']['sip_files']} files")
            return 0
        index = read_index(options.index)
    except (ValueError, subprocess.CalledProcessError) as error:
        print(f"qgis api index: {getattr(error, 'stderr', '') or error}".strip(), file=sys.stderr)
        return 2
    names = plugin_names()
    lines = missing(names, index)
    fine = f"every QGIS name the plugin uses is in {index['source']['tag']}"
    notes = deprecated(names, index) + nonvirtual_overrides(names, index) + unchecked(names, index)
    print("\n".join(lines + notes) or fine)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
