"""Speed paths (issue #31): the command line loads no model library it does not need, and tiles without a
valid pixel never reach the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO

HEAVY = ("torch", "transformers", "sklearn")


def imported_by(*arguments: str, cwd) -> tuple[int, str, set[str]]:
    """Exit status, stderr (without the import timings) and every module `python -m treeseg_qgis ARGUMENTS`
    imported, from `-X importtime`."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "treeseg_qgis", *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    modules, messages = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            messages.append(line)
    return done.returncode, "\n".join(messages), modules


@pytest.mark.parametrize("arguments", [
    ("--help",), ("--version",), ("segment", "--help"), ("fit", "--help"), ("segment-many", "--help"),
    ("teach", "--help"), ("evaluate", "--help"),
])
def test_help_loads_no_model_library(arguments, tmp_path):
    status, _, modules = imported_by(*arguments, cwd=tmp_path)
    assert status == 0
    assert "treeseg_qgis.engine.cli" in modules
    assert not modules & set(HEAVY)


@pytest.mark.parametrize("arguments, message", [
    (("segment",), "the following arguments are required: INPUT, --out"),
    (("segment", "in.tif", "--out", "out", "--clusters", "many"), "must be 'auto' or a whole number"),
    (("segment", "in.tif", "--out", "out", "--tile-size", "100"), "multiple of 16"),
    (("segment", "in.tif", "--out", "out", "--method", "sift"), "invalid choice"),
    (("fit", "in.tif"), "the following arguments are required: --out"),
])
def test_argument_errors_load_no_model_library(arguments, message, tmp_path):
    status, stderr, modules = imported_by(*arguments, cwd=tmp_path)
    assert status == 2 and message in stderr
    assert "Traceback" not in stderr
    assert not modules & set(HEAVY)
    assert not (tmp_path / "out").exists()
