"""The engine's base Python found inside the real QGIS desktop (under Xvfb) with a decoy python3 of QGIS's
version first on PATH, as pyenv, conda or Homebrew put it on an analyst's computer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PYENV_SHIM = Path.home() / ".pyenv" / "shims" / "python3"
QGIS_TIMEOUT = 180

pytestmark = pytest.mark.skipif(not (shutil.which("qgis.bin") and shutil.which("Xvfb")),
                                reason="needs the QGIS desktop (qgis.bin) and Xvfb")


def decoy_python(folder: Path) -> Path:
    """pyenv's shim when there is one, else a python3 of QGIS's version that cannot import GDAL."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if PYENV_SHIM.is_file():
        found = subprocess.run([str(PYENV_SHIM), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if found.stdout.strip() == version:
            return PYENV_SHIM
    decoy = folder / "python3"
    decoy.write_text(f'#!/bin/sh\nexec {sys.base_prefix}/bin/python{version} -S "$@"\n')
    decoy.chmod(0o755)
    return decoy


@pytest.fixture
def display():
    """A virtual screen of our own (Xvfb picks a free display number)."""
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    yield f":{number}"
    server.terminate()
    server.wait(10)


def test_inside_qgis_with_a_decoy_first_on_path_the_engine_is_made_from_qgis_python(tmp_path, display):
    decoy = decoy_python(tmp_path)
    assert subprocess.run([str(decoy), "-c", "import osgeo"], capture_output=True).returncode != 0
    result = tmp_path / "found.json"
    env = dict(os.environ, DISPLAY=display, HOME=str(tmp_path / "home"), PATH=f"{decoy.parent}:{os.environ['PATH']}",
               TREESEG_REPO=str(REPO), TREESEG_OUT=str(result))
    env.pop("QT_QPA_PLATFORM", None)

    qgis = subprocess.run(["qgis.bin", "--nologo", "--noversioncheck", "--profiles-path", str(tmp_path / "profiles"),
                           "--code", str(REPO / "tests" / "desktop" / "discover_base_python.py")],
                          env=env, capture_output=True, text=True, timeout=QGIS_TIMEOUT)

    assert result.is_file(), qgis.stdout[-2000:] + qgis.stderr[-2000:]
    found = json.loads(result.read_text())
    assert found["executable"] == str(decoy), found
    assert "chosen" in found, found
    assert found["chosen"] != str(decoy) and str(decoy) not in found["candidates"]
    checked = subprocess.run([found["chosen"], "-c", "import sys; from osgeo import gdal; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert checked == str(sys.version_info[:2])
