"""Bandit (the QGIS plugin repository gates uploads on it) and the habits it cannot see."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "treeseg_qgis"


def test_bandit_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "bandit", "-r", str(PACKAGE), "-q", "-f", "custom",
                             "--msg-template", "{relpath}:{line} {test_id} {msg}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_eval_exec_pickle_or_shell():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("eval", "exec"):
                offences.append(f"{path.name}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.keyword) and node.arg == "shell":
                offences.append(f"{path.name}:{node.value.lineno} shell=")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(name.split(".")[0] in ("pickle", "dill", "joblib") for name in names):
                    offences.append(f"{path.name}:{node.lineno} pickle-like import")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and getattr(node.value, "value", 0):
                offences.append(f"{path.name}:{node.lineno} allow_pickle=True")
    assert offences == []
