"""The engine set-up inside the real QGIS desktop (under Xvfb): the base Python found with a decoy python3 of QGIS's
version first on PATH, as pyenv, conda or Homebrew put it on an analyst's computer; an unreachable torch index
and a dead PIP_INDEX_URL met with a question or a message in seconds, before pip runs."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import REPO

PYENV_SHIM = Path.home() / ".pyenv" / "shims" / "python3"
QGIS_TIMEOUT = 180
DIALOG_QGIS_TIMEOUT = 600

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


class _LiveIndex(http.server.BaseHTTPRequestHandler):
    """A package index that answers."""

    def do_HEAD(self):  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def live_index():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LiveIndex)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def run_the_dialog(tmp_path: Path, display: str, **environment: str) -> dict:
    """Install clicked in the set-up dialog inside the real QGIS window; what tests/desktop/engine_dialog_messages.py
    saw first (question or status) and after how many seconds."""
    result = tmp_path / "seen.json"
    env = dict(os.environ, DISPLAY=display, HOME=str(tmp_path / "home"), TREESEG_REPO=str(REPO),
               TREESEG_OUT=str(result), TREESEG_ENGINES=str(tmp_path / "profile" / "treeseg"),
               PIP_CONFIG_FILE=os.devnull, **environment)
    for name in ("QT_QPA_PLATFORM", "PIP_FIND_LINKS", "PIP_NO_INDEX", "http_proxy", "HTTP_PROXY", "https_proxy",
                 "HTTPS_PROXY"):
        env.pop(name, None)
    qgis = subprocess.run(["qgis.bin", "--nologo", "--noversioncheck", "--profiles-path", str(tmp_path / "profiles"),
                           "--code", str(REPO / "tests" / "desktop" / "engine_dialog_messages.py")],
                          env=env, capture_output=True, text=True, timeout=DIALOG_QGIS_TIMEOUT)
    assert result.is_file(), qgis.stdout[-2000:] + qgis.stderr[-2000:]
    seen = json.loads(result.read_text())
    print(f"\n{environment}: {seen['seconds']} s to {'a question' if 'question' in seen else 'the message'}")
    return seen


def test_in_the_qgis_window_an_unreachable_torch_index_is_a_question_before_pip(tmp_path, display, live_index):
    seen = run_the_dialog(tmp_path, display, PIP_INDEX_URL=live_index,
                          TREESEG_TORCH_INDEX="http://download.pytorch.invalid/whl/cpu")

    assert seen.get("question", "").startswith("The torch index http://download.pytorch.invalid/whl/cpu could not be "
                                               "reached: the name download.pytorch.invalid is not known"), seen
    assert f"your other package indexes ({live_index}) and looks for torch" in seen["question"]
    assert seen["status"].startswith("Stopped: the torch index could not be reached") and not seen["running"], seen
    assert "== Installing" not in seen["log"]


def test_in_the_qgis_window_a_dead_pip_index_url_is_named_before_pip(tmp_path, display):
    seen = run_the_dialog(tmp_path, display, PIP_INDEX_URL="http://127.0.0.1:9/simple")

    assert "question" not in seen and not seen["running"], seen
    assert "A package index could not be reached, so nothing was downloaded: http://127.0.0.1:9/simple " \
           "(PIP_INDEX_URL): the connection was refused" in seen["status"], seen
    assert "then Install. Nothing was installed" in seen["status"]
    assert "== Installing" not in seen["log"]
