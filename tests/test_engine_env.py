"""The engine's private environment: QGIS's interpreter found on each platform's layout, the plan and its
keying, a real engine built aside offline from a local wheel and checked, the worker spoken to through it, and
the set-up dialog running the same commands through QProcess (install, cancel at each step, a dead index)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from treeseg_qgis import __version__
from treeseg_qgis.memory import folder_bytes
from treeseg_qgis.qgis_side import engine_client, engine_env
from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV, EngineClient, find_engine_python

from .conftest import REPO
from .test_gui import wait_until

PROBE = "treeseg_probe"
PROBE_REQUIREMENT = "treeseg-probe==1.0"
STEP_TIMEOUT = 300
DIALOG_TIMEOUT = 180.0
TEST_SETTING = "treeseg_tests/engine_python"


def write_wheel(folder: Path, pth_line: str) -> Path:
    """A pure-Python wheel of `treeseg_probe` 1.0 whose .pth file adds `pth_line` to sys.path."""
    dist_info = f"{PROBE}-1.0.dist-info"
    files = {
        f"{PROBE}/__init__.py": 'VERSION = "1.0"\n',
        f"{PROBE}.pth": pth_line + "\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: treeseg-tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{PROBE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A folder with the probe wheel; its .pth lets the new environment see this checkout's .venv packages
    (torch, transformers…), as if pip had installed them."""
    folder = tmp_path_factory.mktemp("wheels")
    write_wheel(folder, sysconfig.get_paths()["purelib"])
    return folder


def install_offline(patch: pytest.MonkeyPatch, wheels: Path) -> None:
    """pip installs the probe wheel from `wheels` instead of the engine packages from the indexes, through the
    user's own pip settings (PIP_NO_INDEX, PIP_FIND_LINKS), which the set-up passes on."""
    patch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])
    patch.setenv("PIP_NO_INDEX", "1")
    patch.setenv("PIP_FIND_LINKS", str(wheels))


def run_plan(plan: engine_env.Plan) -> None:
    for step in plan.steps:
        result = subprocess.run(step.command, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                                env=engine_env.step_environment(step, os.environ))
        assert result.returncode == 0, f"{step.title}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def made_engine(tmp_path_factory, wheels) -> engine_env.Engine:
    """A real engine built by the install plan's commands (the real check: imports and a tiny DINOv3 forward
    through the product's loader), run one after the other."""
    root = engine_env.engines_dir(tmp_path_factory.mktemp("profile"))
    with pytest.MonkeyPatch.context() as patch:
        install_offline(patch, wheels)
        plan = engine_env.install_plan(root, engine_env.find_base_python(), engine_env.CPU, "")
        run_plan(plan)
    engine = engine_env.engine_in_use(root, [PROBE_REQUIREMENT])
    assert engine is not None and engine.folder == plan.target and not plan.staging.exists()
    return engine


def fake_files(root: Path, *paths: str) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")


def test_linux_discovery_takes_the_interpreters_of_qgis_prefixes_never_path(tmp_path, monkeypatch):
    fake_files(tmp_path, "usr/bin/python3.11", "usr/bin/python3", "opt/qgis/bin/python3.11", "shims/python3")
    monkeypatch.setenv("PATH", str(tmp_path / "shims"))

    found = engine_env.qgis_python_candidates("Linux", "3.11", [str(tmp_path / "usr")], str(tmp_path / "opt/qgis"),
                                              str(tmp_path / "shims/python3"))

    assert found == [tmp_path / "usr/bin/python3.11", tmp_path / "usr/bin/python3",
                     tmp_path / "opt/qgis/bin/python3.11"]


def test_windows_discovery_finds_osgeo4w_and_standalone_python_never_the_store_stub(tmp_path):
    osgeo4w = tmp_path / "OSGeo4W"
    fake_files(osgeo4w, "apps/qgis-ltr/bin/qgis.exe", "apps/Python312/python.exe", "apps/Python39/python.exe")
    standalone = tmp_path / "Program Files/QGIS 3.40.6"
    fake_files(standalone, "apps/qgis/bin/qgis-bin.exe", "apps/Python312/python.exe")
    store = tmp_path / "Users/me/AppData/Local/Microsoft/WindowsApps"
    fake_files(store, "python.exe")

    assert engine_env.qgis_python_candidates("Windows", "3.12", [str(store)], str(osgeo4w / "apps/qgis-ltr"),
                                             str(osgeo4w / "bin/qgis-ltr-bin.exe")) == [
        osgeo4w / "apps/Python312/python.exe", osgeo4w / "apps/Python39/python.exe"]
    assert engine_env.qgis_python_candidates("Windows", "3.12", [str(standalone / "apps/Python312")],
                                             str(standalone / "apps/qgis")) == [
        standalone / "apps/Python312/python.exe"]
    assert engine_env.qgis_python_candidates("Windows", "3.12", [str(store)]) == []


def test_macos_discovery_finds_the_interpreter_inside_qgis_app(tmp_path):
    bundle = tmp_path / "Applications/QGIS-LTR.app"
    fake_files(bundle, "Contents/MacOS/bin/python3.9", "Contents/MacOS/bin/python3", "Contents/MacOS/QGIS")
    fake_files(tmp_path, "opt/homebrew/bin/python3.9")
    newer = tmp_path / "Applications/QGIS.app"
    fake_files(newer, "Contents/Frameworks/Python.framework/Versions/3.12/bin/python3.12", "Contents/MacOS/QGIS")

    assert engine_env.qgis_python_candidates("Darwin", "3.9", [str(tmp_path / "opt/homebrew")],
                                             str(bundle / "Contents/MacOS"), str(bundle / "Contents/MacOS/QGIS")) == [
        bundle / "Contents/MacOS/bin/python3.9", bundle / "Contents/MacOS/bin/python3"]
    assert engine_env.qgis_python_candidates(
        "Darwin", "3.12", [str(newer / "Contents/Frameworks/Python.framework/Versions/3.12")], "",
        str(newer / "Contents/MacOS/QGIS")) == [
        newer / "Contents/Frameworks/Python.framework/Versions/3.12/bin/python3.12"]


def test_a_decoy_of_qgis_version_without_gdal_is_refused_and_qgis_python_is_chosen(tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    decoy = tmp_path / "shims" / "python3"
    decoy.parent.mkdir()
    decoy.write_text(f"#!/bin/sh\nexec env PYTHONPATH= PYTHONNOUSERSITE=1 {sys.executable} -I -S \"$@\"\n")
    decoy.chmod(0o755)
    assert subprocess.run([str(decoy), "-c", "import osgeo"], capture_output=True).returncode != 0

    assert engine_env.find_base_python([decoy, *engine_env.base_python_candidates()]) != str(decoy)
    with pytest.raises(engine_env.EngineEnvError, match=f"Python {version} without GDAL"):
        engine_env.find_base_python([decoy])
    chosen = engine_env.find_base_python()
    checked = subprocess.run([chosen, "-c", "import sys; from osgeo import gdal; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert checked == str(sys.version_info[:2])


def test_a_python_without_venv_gets_an_instruction_and_another_version_is_refused(tmp_path):
    without_venv = tmp_path / "python3"
    without_venv.write_text(f"#!/bin/sh\necho {sys.version_info.major}.{sys.version_info.minor}\necho gdal 3.6.2\n"
                            "echo 'No module named ensurepip' >&2\nexit 1\n")
    without_venv.chmod(0o755)
    other = tmp_path / "python3.9"
    other.write_text("#!/bin/sh\necho 3.9\necho gdal 3.6.2\n")
    other.chmod(0o755)

    with pytest.raises(engine_env.EngineEnvError, match="install python3-venv"):
        engine_env.find_base_python([str(without_venv)])
    with pytest.raises(engine_env.EngineEnvError, match="Python 3.9, not QGIS's"):
        engine_env.find_base_python([str(other)])
    with pytest.raises(engine_env.EngineEnvError, match="none found"):
        engine_env.find_base_python([])


def test_the_engine_is_keyed_by_its_contents_not_the_plugin_version():
    pins = ["torch==2.13.0", "transformers==5.24.0"]

    key = engine_env.engine_key(pins, engine_env.CPU, "3.11")

    assert key.startswith("cpu-") and key == engine_env.engine_key(list(reversed(pins)), "cpu", "3.11")
    assert key == engine_env.engine_key(["Torch==2.13.0", "transformers==5.24.0"], "cpu", "3.11")
    others = {engine_env.engine_key(["torch==2.13.1", "transformers==5.24.0"], "cpu", "3.11"),
              engine_env.engine_key(pins, "cu130", "3.11"), engine_env.engine_key(pins, "cpu", "3.12")}
    assert key not in others and len(others) == 3
    assert __version__ not in key


def test_the_plan_builds_aside_keeps_the_users_indexes_and_adds_torchs_as_an_extra(tmp_path):
    root = engine_env.engines_dir(tmp_path)
    pins = engine_env.engine_requirements()

    plan = engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU)

    key = engine_env.engine_key(pins, engine_env.CPU)
    assert plan.target == root / f"engine-{key}" and plan.staging == root / f"staging-{key}"
    python, constraints = str(engine_env.venv_python(plan.staging)), str(plan.staging / "qgis-constraints.txt")
    commands = [step.command for step in plan.steps]
    assert commands[:5] == [
        ("/usr/bin/python3.11", "-m", "venv", "--clear", "--system-site-packages", str(plan.staging)),
        (python, "-c", engine_env.PROBE_RUNNER, str(REPO), "https://download.pytorch.org/whl/cpu"),
        ("/usr/bin/python3.11", "-c", engine_env.QGIS_VERSIONS_SCRIPT, constraints),
        (python, "-m", "pip", "install", "--retries", "2", "--timeout", "10",
         "--extra-index-url", "https://download.pytorch.org/whl/cpu", "--constraint", constraints,
         *engine_env.pip_requirements(pins, engine_env.CPU), "numpy", "scipy", "matplotlib"),
        (python, "-c", engine_env.ENGINE_CHECK, str(REPO), "cpu"),
    ]
    assert commands[5][:2] == ("/usr/bin/python3.11", "-c") and commands[5][3:6] == (str(REPO), str(plan.staging),
                                                                                     str(plan.target))
    assert [step.kind for step in plan.steps] == ["venv", "probe", "pins", "pip", "check", "swap"]
    assert [step.swaps_engine for step in plan.steps] == [False] * 5 + [True]
    assert not any("--index-url" in command for command in commands)
    cuda = engine_env.install_plan(root, "/usr/bin/python3.11", "cu130").steps[3]
    assert "https://download.pytorch.org/whl/cu130" in cuda.command and "torch (CUDA, cu130)" in cuda.title
    assert pins[0] in cuda.command
    mirror = engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU, torch_index="")
    assert "--extra-index-url" not in mirror.steps[3].command and mirror.steps[1].command[-1] == ""
    assert mirror.target == plan.target and mirror.staging == plan.staging


def test_the_requirements_are_those_requirements_txt_pins(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# engine\ntorch==2.13.0  # CPU\nTransformers==5.24.0\nscikit_learn==1.9.1\n"
                            "huggingface-hub==2.4.0\npytest==8.*\nsafetensors\n")

    assert engine_env.engine_requirements(requirements) == [
        "torch==2.13.0", "Transformers==5.24.0", "scikit_learn==1.9.1", "scikit-image", "huggingface-hub==2.4.0",
        "safetensors", "onnxruntime", "onnx", "dask"]
    pinned = engine_env.engine_requirements(REPO / "requirements.txt")
    assert engine_env.engine_requirements() == pinned
    assert pinned[0].startswith("torch==") and pinned[1].startswith("transformers==")
    assert pinned[-1].startswith("dask[distributed]==")


SCIKIT_IMAGE_PINS = ('scikit-image==0.24.0; python_version < "3.13"  # no 3.13 wheel\n'
                     "scikit-image==0.25.2; python_version >= '3.13'\n")


@pytest.mark.parametrize(("python_version", "pin"), [
    ("3.11", "scikit-image==0.24.0"), ("3.12", "scikit-image==0.24.0"), ("3.13", "scikit-image==0.25.2"),
    ("3.14", "scikit-image==0.25.2")])
def test_the_pins_are_those_whose_marker_holds_for_the_engines_python(tmp_path, python_version, pin):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch==2.13.0\n" + SCIKIT_IMAGE_PINS)

    assert engine_env.engine_requirements(requirements, python_version) == [
        "torch==2.13.0", "transformers", "scikit-learn", pin, "huggingface_hub", "safetensors", "onnxruntime", "onnx",
        "dask"]
    assert engine_env.engine_requirements(REPO / "requirements.txt", python_version)[3] == pin


def test_the_plan_the_key_and_the_ready_marker_use_the_pins_for_the_targets_python(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(SCIKIT_IMAGE_PINS)
    monkeypatch.setattr(engine_env, "requirements_file", lambda: requirements)
    root = engine_env.engines_dir(tmp_path)

    plans = {version: engine_env.install_plan(root, f"/usr/bin/python{version}", engine_env.CPU,
                                              python_version=version) for version in ("3.11", "3.13")}

    for version, pin in (("3.11", "scikit-image==0.24.0"), ("3.13", "scikit-image==0.25.2")):
        plan = plans[version]
        pip = next(step for step in plan.steps if step.kind == engine_env.PIP).command
        assert pin in pip and not any(";" in part or "python_version" in part for part in pip)
        marker = json.loads(next(step for step in plan.steps if step.kind == engine_env.SWAP).command[-1])
        assert marker["python"] == version and pin in marker["requirements"]
        key = engine_env.engine_key(engine_env.engine_requirements(requirements, version), engine_env.CPU, version)
        assert plan.target.name == f"engine-{key}"
    assert plans["3.11"].target != plans["3.13"].target


@pytest.mark.parametrize(("line", "words"), [
    ('scikit-image==0.25.2; python_version >= "3.13', "line 2 (scikit-image==0.25.2; python_version >= \"3.13): "
                                                      "the marker is malformed"),
    ("scikit-image==0.25.2; python_version >=", "the marker is malformed"),
    ("scikit-image==0.25.2; (python_version >= '3.13'", "the marker is malformed"),
    ("scikit-image==0.25.2; python_version >= '3.13' or", "the marker is malformed"),
    ("scikit-image==0.25.2; implementation_name == 'cpython'", "the marker names implementation_name; only "
                                                                "python_version, sys_platform, platform_machine"),
    ("scikit-image==0.25.2; python_version ~= '3.13'", "~= or ==="),
    ("scikit-image==0.25.2", "line 2 (scikit-image==0.25.2): scikit-image is pinned twice for Python 3.11"),
])
def test_a_malformed_marker_or_a_double_pin_is_refused_in_one_line(tmp_path, line, words):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"scikit-image==0.24.0; python_version < '3.13'\n{line}\n")

    with pytest.raises(engine_env.EngineEnvError) as raised:
        engine_env.engine_requirements(requirements, "3.11")

    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith("requirements.txt line 2 (")


@pytest.mark.parametrize(("marker", "holds"), [
    ('python_version >= "3.13"', True),
    ("python_version < '3.9'", False),
    ('python_version == "3.13.0"', True),
    ('python_version > "3.9"', True),
    ('sys_platform == "linux" and (platform_machine == "x86_64" or python_version > "3.20")', True),
    ('sys_platform == "win32" or python_version < "3.13"', False),
    ('"arm" in platform_machine', False),
    ('platform_machine not  in "arm64 aarch64"', True),
    ('"3.13" <= python_version and sys_platform != "darwin"', True),
])
def test_a_marker_holds_alike_with_and_without_packaging(marker, holds, monkeypatch):
    environment = engine_env.marker_environment("3.13", "linux", "x86_64")

    assert engine_env.simple_marker_applies(marker, environment) is holds
    assert engine_env.marker_applies(marker, environment) is holds
    monkeypatch.setitem(sys.modules, "packaging.markers", None)
    assert engine_env.marker_applies(marker, environment) is holds


def test_without_packaging_the_pins_and_a_malformed_marker_are_read_the_same(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "packaging.markers", None)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(SCIKIT_IMAGE_PINS)

    assert engine_env.engine_requirements(requirements, "3.13")[3] == "scikit-image==0.25.2"
    assert engine_env.engine_requirements(requirements, "3.11")[3] == "scikit-image==0.24.0"
    requirements.write_text("scikit-image==0.25.2; python_version >= (3.13)\n")
    with pytest.raises(engine_env.EngineEnvError, match=r"^requirements.txt line 1 \(.*the marker is malformed"):
        engine_env.engine_requirements(requirements, "3.13")


@pytest.mark.parametrize("marker", ['python_version >= "3.13', "python_version >=", "(python_version == '3.13'",
                                    "python_version == '3.13' or", "python_version '3.13'", "",
                                    "python_version == '3.13' sys_platform"])
def test_the_evaluator_without_packaging_refuses_a_malformed_marker(marker):
    with pytest.raises(engine_env.EngineEnvError, match="the marker is malformed"):
        engine_env.simple_marker_applies(marker, engine_env.marker_environment("3.13", "linux", "x86_64"))


def test_only_a_folder_with_the_ready_marker_is_an_engine(tmp_path, monkeypatch):
    root = engine_env.engines_dir(tmp_path)
    half_made = engine_env.venv_python(root / "engine-cpu-0000000000")
    half_made.parent.mkdir(parents=True)
    half_made.write_text("")
    staging = engine_env.venv_python(root / "staging-cpu-1111111111")
    staging.parent.mkdir(parents=True)
    staging.write_text("")
    assert engine_env.ready_engines(root) == [] and engine_env.private_engine_python(tmp_path) is None

    old = make_marked_engine(root, ["torch==2.12.0"])
    assert engine_env.engine_in_use(root, ["torch==2.13.0"]) == old
    current = make_marked_engine(root, ["torch==2.13.0"])
    os.utime(current.folder / engine_env.READY_MARKER, (1, 1))
    assert engine_env.ready_engines(root) == [old, current]
    assert engine_env.engine_in_use(root, ["torch==2.13.0"]) == current
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: ["torch==2.13.0"])
    assert engine_env.private_engine_python(tmp_path) == str(current.python)


def make_marked_engine(root: Path, requirements: list[str],
                       python_version: str = engine_env.PYTHON_VERSION) -> engine_env.Engine:
    """An engine folder with an interpreter file and the ready marker (what the swap writes)."""
    key = engine_env.engine_key(requirements, engine_env.CPU, python_version)
    folder = root / f"engine-{key}"
    python = engine_env.venv_python(folder)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (folder / engine_env.READY_MARKER).write_text(json.dumps({"key": key, "build": "cpu", "requirements": requirements,
                                                              "python": python_version}))
    return engine_env.Engine(folder, key, "cpu", tuple(requirements), python_version)


@pytest.mark.parametrize(("log", "words"), [
    ("OSError: [Errno 28] No space left on device", "disk is full"),
    ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno 111] Connection "
     "refused')\nERROR: No matching distribution found for torch==2.13.0", "could not be reached"),
    ("WARNING: Retrying (Retry(total=1...)) after connection broken by 'NewConnectionError(... Name or service not "
     "known)': /simple/onnx/\nERROR: Cannot install torch==2.13.0 and numpy==1.24.2 because these package versions "
     "have conflicting dependencies.\nERROR: ResolutionImpossible: for help visit https://pip.pypa.io/",
     "conflict with each other"),
    ("WARNING: Retrying ... Read timed out.\nERROR: Could not find a version that satisfies the requirement "
     "transformers==5.24.0 (from versions: 4.1.0, 4.2.0)\nERROR: No matching distribution found for "
     "transformers==5.24.0", "not found on the index at the version required"),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from versions: 2.13.0)\n"
     "ERROR: No matching distribution found for torch==2.13.0+cpu", "torch's CPU build"),
    ("Could not fetch URL https://pypi.org/simple/torch/: ... SSLError(SSLCertVerificationError(1, "
     "'[SSL: CERTIFICATE_VERIFY_FAILED]", "certificate"),
    ("ProxyError('Cannot connect to proxy.')", "proxy refused"),
    ("HTTP error 403 while getting https://mirror/simple/torch/ ... 403 Client Error: Forbidden", "refused access"),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: 2.5.0)\n"
     "ERROR: No matching distribution found for torch==2.13.0", "no torch wheel for this Python"),
    ("Something else entirely", "the log above says why"),
])
def test_a_pip_failure_is_explained_in_words(log, words):
    assert words in engine_env.explain_pip_failure(log)


@pytest.mark.parametrize("button", ["Install", "Repair"])
def test_a_pip_failure_names_the_button_that_tries_again(button):
    for log in ("[Errno 28] No space left on device", "Name or service not known", "403 Forbidden",
                "Tunnel connection failed", "CERTIFICATE_VERIFY_FAILED", "No matching distribution found for onnx",
                "No matching distribution found for torch==2.13.0+cpu", "something else"):
        explanation = engine_env.explain_pip_failure(log, button)
        other = ({"Install", "Repair"} - {button}).pop()
        assert button in explanation and other not in explanation.replace(".", " ").split(), log


def test_pip_progress_moves_with_the_packages_and_megabytes():
    progress = engine_env.PipProgress()
    assert progress.fraction() == 0.0

    progress.feed("Collecting torch==2.13.0\n  Downloading https://x/torch-2.13.0-cp311.whl (200.5 MB)\n"
                  "Collecting transformers==5.24.0\n  Downloading transformers-5.24.0-py3-none-any.whl (12")
    first = progress.fraction()
    progress.feed(".0 MB)\n  Downloading tqdm-4.0-py3-none-any.whl (512 kB)\n")

    assert progress.packages == 2 and progress.megabytes == pytest.approx(213.0)
    assert 0 < first == progress.fraction() < progress.COLLECTING_SHARE
    assert progress.describe() == "2 packages, 213 MB to download; now tqdm-4.0-py3-none-any.whl"
    progress.feed("Installing collected packages: torch, scikit-learn, transformers\n")
    assert progress.fraction() == progress.COLLECTING_SHARE
    assert progress.describe().endswith("installing them: 0 of 3, now torch")


def test_pip_progress_moves_through_installing_as_packages_land_in_the_environment(tmp_path):
    """pip prints nothing while it installs: the packages in place are counted in the new environment."""
    venv = tmp_path / "staging-cpu-1"
    site_packages = venv / "lib" / "python3.11" / "site-packages"
    fake_files(site_packages, "pip-23.0.1.dist-info/RECORD", "torch-2.13.0+cpu.dist-info/METADATA")
    progress = engine_env.PipProgress()
    progress.feed("Collecting torch\nCollecting scikit-learn\nCollecting transformers\n"
                  "Installing collected packages: torch, scikit-learn, transformers\n")
    seen = []

    for landed in ("torch-2.13.0+cpu.dist-info/RECORD", "scikit_learn-1.9.1.dist-info/RECORD",
                   "transformers-5.24.0.dist-info/RECORD"):
        progress.count_installed(venv)
        seen.append((progress.fraction(), progress.describe()))
        fake_files(site_packages, landed)
    progress.count_installed(venv)
    seen.append((progress.fraction(), progress.describe()))

    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(set(fractions)) and fractions[0] == progress.COLLECTING_SHARE and fractions[-1] == 1.0
    assert [text.split("installing them: ")[1] for _, text in seen] == [
        "0 of 3, now torch", "1 of 3, now scikit-learn", "2 of 3, now transformers", "3 of 3"]
    windows = tmp_path / "windows-venv"
    fake_files(windows / "Lib" / "site-packages", "torch-2.13.0+cpu.dist-info/RECORD")
    progress.count_installed(windows)
    assert progress.installed == 1


def test_the_free_disk_check_names_the_space_needed(tmp_path, monkeypatch):
    assert engine_env.free_disk_problem(tmp_path / "profile" / "treeseg", engine_env.CPU) is None
    monkeypatch.setattr(engine_env, "REQUIRED_FREE_BYTES", {engine_env.CPU: 1 << 60})

    problem = engine_env.free_disk_problem(tmp_path / "profile" / "treeseg", engine_env.CPU)

    assert problem is not None and f"disk of {tmp_path}" in problem and "CPU engine needs" in problem


def test_an_existing_python_is_checked_for_everything_the_engine_imports():
    command = engine_env.check_command("/opt/env/bin/python")

    assert command == ("/opt/env/bin/python", "-c", engine_env.ENGINE_CHECK, str(REPO))
    for module in ("torch", "transformers", "sklearn", "skimage", "osgeo.gdal"):
        assert f'"{module}"' in engine_env.ENGINE_CHECK
    assert "load_backbone(folder" in engine_env.ENGINE_CHECK


def test_gpus_are_read_from_nvidia_smi_and_the_driver_picks_the_cuda_build():
    output = "NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06\n\nNVIDIA GeForce RTX 3060, 12288 MiB, 535.183.01\n"

    assert engine_env.parse_gpus(output) == [engine_env.Gpu("NVIDIA H100 80GB HBM3", 81559, "580.65.06"),
                                             engine_env.Gpu("NVIDIA GeForce RTX 3060", 12288, "535.183.01")]
    assert engine_env.GPU_QUERY == ("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader")
    assert [engine_env.cuda_build(driver) for driver in ("580.65.06", "535.183.01", "525.60.13", "470.256.02",
                                                         "[N/A]")] == ["cu130", "cu126", "cu126", None, None]


def test_remove_deletes_only_an_engine_or_a_staging_folder(tmp_path):
    root = engine_env.engines_dir(tmp_path)
    engine = make_marked_engine(root, ["torch==2.13.0"])
    staging = root / "staging-cpu-1"
    staging.mkdir()
    other = tmp_path / "documents"
    other.mkdir()

    with pytest.raises(engine_env.EngineEnvError, match="not an engine environment"):
        engine_env.remove_environment(other)
    engine_env.remove_environment(engine.folder)
    engine_env.remove_environment(staging)

    assert other.is_dir() and not engine.folder.exists() and not staging.exists()


def test_a_real_engine_is_built_aside_checked_and_qgis_python_is_untouched(made_engine):
    import numpy
    import scipy

    versions = subprocess.run([str(made_engine.python), "-c", f"import {PROBE}, numpy; print({PROBE}.VERSION, "
                               "numpy.__version__)"], capture_output=True, text=True, check=True).stdout.split()

    assert versions == ["1.0", numpy.__version__]
    assert (made_engine.folder / "qgis-constraints.txt").read_text().split() == [f"numpy=={numpy.__version__}",
                                                                                 f"scipy=={scipy.__version__}"]
    marker = json.loads((made_engine.folder / engine_env.READY_MARKER).read_text())
    assert marker["requirements"] == [PROBE_REQUIREMENT] and marker["build"] == "cpu"
    assert subprocess.run([engine_env.find_base_python(), "-c", f"import {PROBE}"], capture_output=True).returncode


def test_the_worker_speaks_its_protocol_through_the_made_engine(made_engine):
    python = str(made_engine.python)
    client = EngineClient(python)
    try:
        record = client.probe()
        assert client._process.args[0] == python
    finally:
        client.close()

    assert record["treeseg"] == __version__ and record["torch"].startswith("2.") and record["device"] == "cpu"


def test_a_missing_module_is_reported_as_such_not_as_memory(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'huggingface_hub'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    client = EngineClient(str(broken))
    try:
        with pytest.raises(engine_client.EngineError) as caught:
            client.probe()
    finally:
        client.close()

    message = str(caught.value)
    assert "lacks a package" in message and "huggingface_hub" in message and "memory" not in message


def test_the_private_engine_is_found_after_the_setting_and_the_variable(qgis_app, tmp_path, monkeypatch):
    from qgis.core import QgsApplication

    assert engine_client.qgis_profile_dir() == QgsApplication.qgisSettingsDirPath()
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", tmp_path / "none.txt")
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", tmp_path / "plugin" / "treeseg_qgis")
    monkeypatch.delenv(ENGINE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: ["torch==2.13.0"])
    half_made = engine_env.venv_python(engine_env.engines_dir(tmp_path) / "engine-cpu-0000000000")
    half_made.parent.mkdir(parents=True)
    half_made.write_text("")
    half_made.chmod(0o755)
    assert find_engine_python(None) is None

    engine = make_marked_engine(engine_env.engines_dir(tmp_path), ["torch==2.13.0"])
    engine.python.chmod(0o755)

    assert find_engine_python(None) == str(engine.python)
    assert find_engine_python(sys.executable) == sys.executable
    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    assert find_engine_python(None) == sys.executable


@pytest.fixture
def test_setting(monkeypatch):
    """The dialog reads and writes a throw-away setting instead of the real engine setting."""
    from qgis.core import QgsSettings

    monkeypatch.setattr(engine_client, "ENGINE_PYTHON_SETTING", TEST_SETTING)
    QgsSettings().remove(TEST_SETTING)
    yield TEST_SETTING
    QgsSettings().remove(TEST_SETTING)


def test_the_plugin_without_an_engine_offers_the_set_up_and_uses_the_new_engine_at_once(
        qgis_iface, qgis_new_project, tmp_path, monkeypatch):
    from treeseg_qgis import classFactory
    from treeseg_qgis.qgis_side.plugin import MENU

    nowhere = tmp_path / "nowhere"
    plugin_dir = engine_client.PLUGIN_DIR
    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(nowhere / "python"))
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", nowhere / "treeseg_qgis")
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", nowhere / "engine_python.txt")
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(nowhere))
    monkeypatch.setattr(engine_client, "ENGINE_PYTHON_SETTING", "treeseg_tests/no_such_setting")
    main_window = qgis_iface.mainWindow()
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    setup_action = plugin.setup_action
    try:
        dock = plugin.dock
        panel = dock.run_panel
        assert plugin.engine is None and not panel.run_button.isEnabled()
        assert panel.setup_button.isVisibleTo(dock)
        qgis_iface.addPluginToRasterMenu.assert_any_call(MENU, setup_action)

        panel.setup_button.click()
        dialog = plugin.setup_dialog
        assert dialog is not None and dialog.isVisible()
        setup_action.trigger()
        assert plugin.setup_dialog is dialog

        dialog.engine_ready.emit(sys.executable)
        assert plugin.engine is not None and plugin.engine.python == sys.executable
        assert panel.probe.engine is plugin.engine and panel.run_button.isEnabled()
        assert not panel.setup_button.isVisibleTo(dock) and panel.engine_label.text().startswith("Engine: ")

        broken = tmp_path / "broken" / "python"
        broken.parent.mkdir()
        broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'huggingface_hub'\" >&2\nexit 3\n")
        broken.chmod(0o755)
        monkeypatch.setattr(engine_client, "PLUGIN_DIR", plugin_dir)
        main_window.show()
        plugin.action.trigger()
        dialog.engine_ready.emit(str(broken))
        wait_until(lambda: "not usable" in panel.engine_label.text(), DIALOG_TIMEOUT)
        assert panel.setup_button.isVisible() and plugin.engine.python == str(broken)
        assert not panel.run_button.isEnabled()
        assert "huggingface_hub" in panel.engine_label.text() and "memory" not in panel.engine_label.text()
    finally:
        plugin.unload()
        main_window.hide()
    assert plugin.setup_dialog is None and plugin.setup_action is None
    qgis_iface.removePluginRasterMenu.assert_any_call(MENU, setup_action)


def previous_engine(root: Path) -> engine_env.Engine:
    """A ready engine made for older pins: the one in use before a new set-up."""
    engine = make_marked_engine(root, ["treeseg-probe==0.9"])
    engine.python.unlink()
    engine.python.symlink_to(sys.executable)
    return engine


def test_the_dialog_builds_aside_swaps_in_and_offers_to_remove_the_old(qgis_app, tmp_path, wheels, test_setting,
                                                                        monkeypatch):
    from qgis.core import QgsSettings
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.qgis_side.gui.engine_setup import PROGRESS_RANGE, EngineSetupDialog

    install_offline(monkeypatch, wheels)
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    questions = []
    monkeypatch.setattr(QMessageBox, "question", lambda *args: questions.append(args[2]) or
                        QMessageBox.StandardButton.Yes)
    QgsSettings().setValue(test_setting, "/somewhere/else/python")
    root = engine_env.engines_dir(tmp_path)
    old = previous_engine(root)
    legacy = root / "engine-0.1.0"
    (legacy / "bin").mkdir(parents=True)
    dialog = EngineSetupDialog(root)
    dialog.torch_index.setText("")
    ready, stops, removed = [], [], []
    dialog.engine_ready.connect(ready.append)
    dialog.stop_engine_requested.connect(lambda: stops.append(True))
    dialog.engine_removed.connect(lambda: removed.append(True))
    assert "made for other package versions" in dialog.folder_label.text()
    assert dialog.install_button.isEnabled() and dialog.repair_button.isEnabled()
    assert dialog.gpu_label.text().startswith("No NVIDIA GPU found")

    dialog.install_button.click()
    assert dialog.running and dialog.cancel_button.isEnabled() and not dialog.install_button.isEnabled()
    seen_progress = set()
    wait_until(lambda: seen_progress.add(dialog.progress_bar.value()) or not dialog.running, DIALOG_TIMEOUT)

    log = dialog.log.toPlainText()
    new = engine_env.engine_in_use(root, [PROBE_REQUIREMENT])
    assert new is not None and new.folder != old.folder and ready == [str(new.python)], dialog.status_label.text()
    assert dialog.status_label.text().startswith("The engine is ready"), dialog.status_label.text() + log
    assert "a tiny DINOv3 forward ran" in log and "== Moving the engine into place" in log
    assert len(seen_progress) >= 5 and dialog.progress_bar.value() == PROGRESS_RANGE
    assert questions and str(old.folder) in questions[0] and str(legacy) in questions[0]
    wait_until(lambda: not old.folder.exists() and not legacy.exists(), DIALOG_TIMEOUT)
    assert not dialog.install_button.isEnabled() and dialog.repair_button.isEnabled()
    assert QgsSettings().value(test_setting, "", type=str) == "" and stops == []
    assert dialog.engine_label.text() == f"{new.python} (made by Set up the engine…)"

    dialog.repair_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [str(new.python)] * 2 and stops == [True], dialog.log.toPlainText()
    assert engine_env.ready_engines(root) == [new] and sorted(path.name for path in root.iterdir()) == [new.folder.name]

    dialog.remove_button.click()
    # Set aside at once: while the task deletes it, nothing reading the engines folder sees a half-deleted engine.
    assert not new.folder.exists() and engine_env.ready_engines(root) == [] and dialog.running
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert removed == [True] and stops == [True, True] and sorted(root.iterdir()) == []
    assert dialog.install_button.isEnabled() and not dialog.remove_button.isEnabled()
    dialog.deleteLater()


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4])
def test_cancel_during_each_step_keeps_the_previous_engine(qgis_app, tmp_path, wheels, test_setting, monkeypatch,
                                                           step):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    install_offline(monkeypatch, wheels)
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    root = engine_env.engines_dir(tmp_path)
    old = previous_engine(root)
    dialog = EngineSetupDialog(root)
    dialog.torch_index.setText("")
    ready = []
    dialog.engine_ready.connect(ready.append)

    dialog.install_button.click()
    wait_until(lambda: dialog._step_index >= step, DIALOG_TIMEOUT)
    assert dialog._step_index == step and dialog.process is not None, "the step ended before it could be cancelled"
    dialog.cancel_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    status = dialog.status_label.text()
    assert ready == [] and status.startswith("Cancelled.") and f"the engine in use is still {old.python}" in status
    assert engine_env.ready_engines(root) == [old] and not dialog.plan and dialog.progress_bar.value() == 0
    wait_until(lambda: sorted(path.name for path in root.iterdir()) == [old.folder.name], DIALOG_TIMEOUT)
    assert dialog.process is None and not dialog.cancel_button.isEnabled()
    assert "made for other package versions" in dialog.folder_label.text()
    dialog.deleteLater()


def test_a_dead_index_is_named_before_pip_runs_and_the_message_waits_for_no_deletion(qgis_app, tmp_path, wheels,
                                                                                      test_setting, monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    install_offline(monkeypatch, wheels)
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    root = engine_env.engines_dir(tmp_path)
    old = previous_engine(root)
    dialog = EngineSetupDialog(root)
    dialog.torch_index.setText("")

    dialog.install_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    status = dialog.status_label.text()
    assert "http://127.0.0.1:9/simple (PIP_INDEX_URL): the connection was refused" in status, status
    assert "could not be reached" in status and f"the engine in use is still {old.python}" in status, status
    assert status.endswith("then Install. Nothing was installed; the engine in use is still " + f"{old.python}.")
    assert "== Installing" not in dialog.log.toPlainText() and dialog.progress_bar.value() == 0
    assert not (root / f"staging-{engine_env.engine_key([PROBE_REQUIREMENT], 'cpu')}").exists()
    wait_until(lambda: sorted(p.name for p in root.iterdir()) == [old.folder.name], DIALOG_TIMEOUT)
    assert engine_env.ready_engines(root) == [old]
    dialog.deleteLater()


def test_an_unchanged_set_of_pins_reuses_the_engine_after_a_plugin_upgrade(qgis_app, tmp_path, test_setting,
                                                                            monkeypatch):
    from treeseg_qgis.qgis_side.gui import engine_setup
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])
    root = engine_env.engines_dir(tmp_path)
    engine = make_marked_engine(root, [PROBE_REQUIREMENT])
    engine.python.chmod(0o755)
    monkeypatch.setattr(engine_setup, "__version__", "9.9.9")

    dialog = EngineSetupDialog(root)

    assert find_engine_python(None) == str(engine.python)
    assert not dialog.install_button.isEnabled() and dialog.repair_button.isEnabled()
    assert f"installed: {engine.folder.name} (cpu)" in dialog.folder_label.text()
    assert dialog.status_label.text().startswith(f"Ready: {engine.folder.name} was made for exactly these package "
                                                 f"versions")
    assert dialog.packages_label.text() == "treeseg-probe 1.0: the versions TreeSeg 9.9.9 was tested with"
    dialog.deleteLater()


def test_an_existing_python_is_checked_before_it_is_used(qgis_app, tmp_path, test_setting):
    from qgis.core import QgsSettings

    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    dialog = EngineSetupDialog(engine_env.engines_dir(tmp_path))
    ready = []
    dialog.engine_ready.connect(ready.append)

    dialog.python_widget.setFilePath(str(tmp_path / "missing" / "python"))
    dialog.use_python_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [] and dialog.status_label.text().endswith("could not be started.")

    dialog.python_widget.setFilePath(engine_env.find_base_python())
    dialog.use_python_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [] and "failed" in dialog.status_label.text()
    assert "This Python lacks what the TreeSeg engine needs: " in dialog.log.toPlainText()  # (3.44 root: has torch)
    assert QgsSettings().value(test_setting, "", type=str) == ""

    dialog.python_widget.setFilePath(sys.executable)
    dialog.use_python_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [sys.executable], dialog.log.toPlainText()
    assert QgsSettings().value(test_setting, "", type=str) == sys.executable
    dialog.deleteLater()


def test_cuda_is_offered_when_nvidia_smi_finds_a_gpu(qgis_app, tmp_path, monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    dialog = EngineSetupDialog(engine_env.engines_dir(tmp_path))
    wait_until(lambda: dialog.build_combo.count() == 2, DIALOG_TIMEOUT)

    assert dialog.build_combo.currentData() == "cu130"
    assert dialog.build_combo.currentText() == "CUDA (cu130): NVIDIA H100 80GB HBM3, 80 GB"
    assert dialog.gpu_label.text() == "NVIDIA H100 80GB HBM3 found: the CUDA engine (cu130) will be installed."
    assert dialog.torch_index.text() == "https://download.pytorch.org/whl/cu130"
    assert dialog.build_combo.itemData(0) == engine_env.CPU
    dialog.deleteLater()


def test_a_full_disk_is_refused_before_anything_starts(qgis_app, tmp_path, test_setting, monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_env, "REQUIRED_FREE_BYTES", {engine_env.CPU: 1 << 60})
    dialog = EngineSetupDialog(engine_env.engines_dir(tmp_path))

    dialog.install_button.click()

    assert not dialog.running and dialog.process is None and "CPU engine needs" in dialog.status_label.text()
    assert not engine_env.engines_dir(tmp_path).exists()
    dialog.deleteLater()


def test_macos_discovery_finds_conda_forge_and_macports_qgis_but_not_a_homebrew_decoy(tmp_path):
    conda = tmp_path / "Users/me/miniforge3/envs/gis"
    fake_files(conda, "bin/python3.12", "bin/python3", "bin/qgis", "conda-meta/qgis-3.40.6.json")
    macports_app = tmp_path / "Applications/MacPorts/QGIS3.app"
    fake_files(macports_app, "Contents/MacOS/QGIS")
    framework = tmp_path / "opt/local/Library/Frameworks/Python.framework/Versions/3.11"
    fake_files(framework, "bin/python3.11", "lib/python3.11/os.py")
    fake_files(tmp_path, "opt/homebrew/bin/python3.12", "opt/local/bin/python3.11")

    assert engine_env.qgis_python_candidates("Darwin", "3.12", [str(conda)], str(conda),
                                             str(conda / "bin/python3.12")) == [conda / "bin/python3.12"]
    assert engine_env.qgis_python_candidates("Darwin", "3.11", [str(framework)], str(macports_app / "Contents/MacOS"),
                                             str(macports_app / "Contents/MacOS/QGIS")) == [
        framework / "bin/python3.11"]
    assert engine_env.qgis_python_candidates("Darwin", "3.12", [str(tmp_path / "opt/homebrew")]) == []


def test_a_bundled_macos_python_gets_its_bundle_as_pythonhome_and_every_other_python_none(tmp_path):
    bundle = tmp_path / "Applications/QGIS.app"
    fake_files(bundle, "Contents/MacOS/python3.12", "Contents/Frameworks/lib/python3.12/os.py")
    framework_bundle = tmp_path / "Applications/QGIS-LTR.app"
    versions = framework_bundle / "Contents/Frameworks/Python.framework/Versions/3.12"
    fake_files(versions, "bin/python3.12", "lib/python3.12/os.py")
    staging_python = engine_env.venv_python(tmp_path / "profile/treeseg/staging-cpu-1")
    environ = {"PYTHONHOME": "/somewhere/qgis/set", "PATH": "/usr/bin"}

    home = bundle / "Contents/Frameworks"
    assert engine_env.bundled_python_home(bundle / "Contents/MacOS/python3.12", "3.12") == home
    assert engine_env.bundled_python_home(versions / "bin/python3.12", "3.12") == versions
    assert engine_env.bundled_python_home(bundle / "Contents/MacOS/python3.11", "3.11") is None
    assert engine_env.bundled_python_home("/usr/bin/python3.11") is None
    assert engine_env.process_environment(environ, bundle / "Contents/Frameworks")["PYTHONHOME"] == str(
        bundle / "Contents/Frameworks")
    assert "PYTHONHOME" not in engine_env.command_environment([str(staging_python), "-m", "pip"], environ)
    assert "PYTHONHOME" not in engine_env.command_environment(["/usr/bin/python3.11", "-m", "venv"], environ)
    assert engine_env.command_environment(["/usr/bin/python3.11"], environ)["PATH"] == "/usr/bin"


def test_a_python_whose_venvs_do_not_start_on_their_own_is_passed_over(tmp_path):
    """What app-bundle wrappers do on some macOS QGIS builds: their venvs look for the standard library where
    QGIS was built; the check's trial venv shows it and the next candidate is taken."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wrapper = tmp_path / "QGIS.app/Contents/MacOS/python3"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\necho {version}\necho gdal 3.6.2\n"
                       "echo \"broken venv: ModuleNotFoundError: No module named 'encodings'\"\nexit 1\n")
    wrapper.chmod(0o755)

    with pytest.raises(engine_env.EngineEnvError, match="makes virtual environments that do not start on their own"
                                                        r" \(ModuleNotFoundError: No module named 'encodings'\)"):
        engine_env.find_base_python([wrapper])
    assert engine_env.find_base_python([wrapper, *engine_env.base_python_candidates()]) != str(wrapper)


def test_flatpak_is_recognised_for_the_advice_it_needs(tmp_path):
    assert engine_env.in_flatpak({"FLATPAK_ID": "org.qgis.qgis"}, tmp_path)
    assert not engine_env.in_flatpak({}, tmp_path)
    (tmp_path / ".flatpak-info").write_text("[Application]\nname=org.qgis.qgis\n")
    assert engine_env.in_flatpak({}, tmp_path)


def test_the_cpu_engine_asks_pip_for_torchs_cpu_build_on_linux_x86_64_only():
    pins = ["torch==2.13.0", "transformers==5.24.0", "safetensors"]

    assert engine_env.pip_requirements(pins, "cpu", "Linux", "x86_64") == [
        "torch==2.13.0+cpu", "transformers==5.24.0", "safetensors"]
    assert engine_env.pip_requirements(pins, "cu130", "Linux", "x86_64") == pins
    assert engine_env.pip_requirements(pins, "cpu", "Darwin", "arm64") == pins
    assert engine_env.pip_requirements(pins, "cpu", "Windows", "AMD64") == pins
    assert engine_env.pip_requirements(["torch==2.13.0+cpu"], "cpu", "Linux", "x86_64") == ["torch==2.13.0+cpu"]


def test_the_cpu_check_refuses_a_cuda_torch():
    assert "torch.version.cuda" in engine_env.ENGINE_CHECK and "in a CPU engine" in engine_env.ENGINE_CHECK
    assert engine_env.check_command("/e/bin/python", "cpu")[-1] == "cpu"
    assert engine_env.check_command("/e/bin/python")[-1] == str(REPO)


def test_the_version_has_one_source_metadata_txt():
    from treeseg_qgis import _metadata_version

    written = [line.split("=", 1)[1] for line in (REPO / "metadata.txt").read_text().splitlines()
               if line.startswith("version=")]
    assert [__version__] == written == [_metadata_version()]
    assert '__version__ = "' not in (REPO / "treeseg_qgis" / "__init__.py").read_text()


def test_an_engine_made_from_another_python_version_is_never_used(tmp_path, monkeypatch):
    root = engine_env.engines_dir(tmp_path)
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: ["torch==2.13.0"])
    stale = make_marked_engine(root, ["torch==2.13.0"], "3.9")

    assert engine_env.ready_engines(root) == [stale] and stale.python_version == "3.9"
    assert engine_env.engine_in_use(root) is None and engine_env.private_engine_python(tmp_path) is None
    assert engine_env.other_python_engines(root) == [stale]
    current = make_marked_engine(root, ["torch==2.13.0"])
    assert engine_env.engine_in_use(root) == current and engine_env.other_python_engines(root) == [stale]


def test_the_swap_puts_the_previous_engine_back_when_the_new_one_cannot_be_moved(tmp_path):
    """The rename fails for real: the staging folder is on another file system (/dev/shm) than the engines."""
    shared_memory = Path("/dev/shm")
    if not shared_memory.is_dir() or shared_memory.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test folder")
    root = engine_env.engines_dir(tmp_path)
    old = make_marked_engine(root, ["torch==2.13.0"])
    before = (old.folder / engine_env.READY_MARKER).read_text()
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=shared_memory))
    try:
        fake_files(staging, "bin/python")
        with pytest.raises(engine_env.EngineEnvError, match="the previous engine was put back"):
            engine_env.swap_in(staging, old.folder, json.dumps({"key": "new"}))

        assert (old.folder / engine_env.READY_MARKER).read_text() == before
        assert engine_env.engine_in_use(root, ["torch==2.13.0"]) == old
        assert sorted(path.name for path in root.iterdir()) == [old.folder.name]
        assert not (staging / engine_env.READY_MARKER).exists() and (staging / "bin/python").exists()
    finally:
        shutil.rmtree(staging)


def test_the_swap_through_its_script_moves_the_new_engine_in_and_the_old_out(tmp_path):
    root = engine_env.engines_dir(tmp_path)
    old = make_marked_engine(root, ["torch==2.13.0"])
    staging = root / "staging-cpu-2"
    fake_files(staging, "bin/python")
    marker = json.dumps({"key": "cpu-2", "build": "cpu", "requirements": ["torch==2.13.1"],
                         "python": engine_env.PYTHON_VERSION})

    subprocess.run([sys.executable, "-c", engine_env.SWAP_RUNNER, str(REPO), str(staging), str(old.folder), marker],
                   check=True, capture_output=True, text=True)

    assert json.loads((old.folder / engine_env.READY_MARKER).read_text())["key"] == "cpu-2"
    assert sorted(path.name for path in root.iterdir()) == [old.folder.name]
    failed = subprocess.run([sys.executable, "-c", engine_env.SWAP_RUNNER, str(REPO), str(root / "staging-none"),
                             str(old.folder), marker], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith("The new engine in ")
    assert "Traceback" not in failed.stderr
    assert json.loads((old.folder / engine_env.READY_MARKER).read_text())["key"] == "cpu-2"


def test_leftover_folders_are_found_measured_and_set_aside(tmp_path):
    root = engine_env.engines_dir(tmp_path)
    engine = make_marked_engine(root, ["torch==2.13.0"])
    staging = root / "staging-cpu-1"
    fake_files(staging, "bin/python")
    (staging / "lib.bin").write_bytes(b"x" * 3_000_000)
    (staging / "bin/python3").symlink_to(sys.executable)
    old = root / "old-engine-cpu-0"
    old.mkdir()

    assert engine_env.leftover_folders(root) == [old, staging]
    assert folder_bytes(staging) == 3_000_000
    aside = engine_env.set_aside(staging)
    assert aside == root / "old-staging-cpu-1" and not staging.exists()
    staging.mkdir()
    assert engine_env.set_aside(staging) == root / "old-staging-cpu-1-1"
    assert engine_env.leftover_folders(root) == [old, aside, root / "old-staging-cpu-1-1"]
    assert engine.folder not in engine_env.leftover_folders(root)
    assert engine_env.leftover_folders(tmp_path / "none") == []


def test_pip_settings_are_read_as_pip_ranks_them_and_each_index_named_by_its_source():
    listed = ("global.index-url='https://mirror.example/simple'\n"
              "global.extra-index-url='file:///opt/pypi/simple https://extra.example/simple'\n"
              "install.index-url='https://install.example/simple'\n"
              "global.proxy='http://proxy.example:3128'\n")

    settings = engine_env.pip_settings(listed)
    assert settings["index-url"] == ("https://install.example/simple", "install")
    assert [(check.url, check.source, check.torch) for check in engine_env.pip_indexes(settings, "https://t/cpu")] == [
        ("https://install.example/simple", "pip's configuration (install.index-url)", False),
        ("file:///opt/pypi/simple", "pip's configuration (global.extra-index-url)", False),
        ("https://extra.example/simple", "pip's configuration (global.extra-index-url)", False),
        ("https://t/cpu", "the torch index", True)]

    from_env = engine_env.pip_settings(listed + ":env:.index-url='http://127.0.0.1:9/simple'\n")
    assert engine_env.pip_indexes(from_env, "")[0] == engine_env.IndexCheck("http://127.0.0.1:9/simple",
                                                                            "PIP_INDEX_URL")
    assert engine_env.pip_indexes({}, "")[0].url == engine_env.PYPI
    assert engine_env.pip_indexes(engine_env.pip_settings(":env:.no-index='1'\n"), "https://t/cpu") == []


class _Answer(http.server.BaseHTTPRequestHandler):
    """A package index that answers every request with 200, or a proxy that asks for credentials (407)."""

    status = 200

    def do_HEAD(self):  # noqa: N802 - the name http.server calls
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


class _ProxyAsksForCredentials(_Answer):
    status = 407


@pytest.fixture
def local_server():
    """Starts a local HTTP server of a handler class; yields its address."""
    servers = []

    def start(handler=_Answer) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_each_index_is_probed_once_and_a_dead_index_or_proxy_is_named(local_server, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    index = local_server() + "/simple"

    assert engine_env.probe_index(index) is None
    assert engine_env.probe_index("http://user:secret@" + index.split("//")[1]) is None
    assert engine_env.probe_index("file:///nowhere/simple") is None
    assert engine_env.probe_index("http://127.0.0.1:9/simple") == "the connection was refused"
    assert engine_env.probe_index("http://name.invalid/simple").startswith("the name name.invalid is not known")
    assert engine_env.probe_index(index, proxy="http://127.0.0.1:9") == (
        "the proxy http://127.0.0.1:9: the connection was refused")
    asking = local_server(_ProxyAsksForCredentials)
    assert engine_env.probe_index(index, proxy=asking) == f"the proxy {asking} asks for credentials (407)"
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert engine_env.probe_index(index).startswith("the proxy http://127.0.0.1:9")

    checks = engine_env.probe_indexes([engine_env.IndexCheck(index, "PIP_INDEX_URL"),
                                       engine_env.IndexCheck("http://127.0.0.1:9/whl/cpu", "the torch index", True)])
    assert engine_env.probe_status(checks) == engine_env.PROBE_INDEX_UNREACHABLE
    monkeypatch.delenv("http_proxy")
    checks = engine_env.probe_indexes([engine_env.IndexCheck(index, "PIP_INDEX_URL"),
                                       engine_env.IndexCheck("http://127.0.0.1:9/whl/cpu", "the torch index", True)])
    assert [check.problem for check in checks] == [None, "the connection was refused"]
    assert engine_env.probe_status(checks) == engine_env.PROBE_EXTRA_UNREACHABLE
    assert engine_env.probe_status(checks[:1]) == 0 and engine_env.probe_status([]) == 0
    choice = engine_env.extra_index_choice(checks, "torch==2.13.0+cpu")
    assert choice.startswith("The torch index http://127.0.0.1:9/whl/cpu could not be reached: the connection was "
                             "refused.\n\nGo on without it: ")
    assert f"your other package indexes ({index}) and looks for torch==2.13.0+cpu there" in choice
    assert engine_env.without_dead_extras(checks, "http://127.0.0.1:9/whl/cpu") == ("", None)


def test_the_probe_step_reads_pips_own_settings_and_says_which_index_is_dead(local_server, tmp_path):
    """The probe as the plan runs it: in a Python with pip, PIP_INDEX_URL from the environment, one line per index
    and the summary the dialog reads."""
    live = local_server() + "/simple"
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_EXTRA_INDEX_URL=live)
    for name in ("PIP_NO_INDEX", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        env.pop(name, None)

    dead = subprocess.run([sys.executable, "-c", engine_env.PROBE_RUNNER, str(REPO), "https://t.invalid/whl/cpu"],
                          capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT)

    assert dead.returncode == engine_env.PROBE_INDEX_UNREACHABLE, dead.stdout + dead.stderr
    assert "NOT reached: http://127.0.0.1:9/simple (PIP_INDEX_URL): the connection was refused" in dead.stdout
    assert f"answers: {live} (PIP_EXTRA_INDEX_URL)" in dead.stdout
    checks = engine_env.read_probe(dead.stdout)
    assert [(check.source, check.problem is None) for check in checks] == [
        ("PIP_INDEX_URL", False), ("PIP_EXTRA_INDEX_URL", True), ("the torch index", False)]
    message = engine_env.unreachable_message(checks, "Install")
    assert "http://127.0.0.1:9/simple (PIP_INDEX_URL): the connection was refused" in message
    assert message.endswith("then Install.")

    env["PIP_INDEX_URL"] = live
    torch_only = subprocess.run([sys.executable, "-c", engine_env.PROBE_RUNNER, str(REPO), "http://127.0.0.1:9/cpu"],
                                capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT)
    assert torch_only.returncode == engine_env.PROBE_EXTRA_UNREACHABLE, torch_only.stdout + torch_only.stderr
    env["PIP_NO_INDEX"] = "1"
    offline = subprocess.run([sys.executable, "-c", engine_env.PROBE_RUNNER, str(REPO), "http://127.0.0.1:9/cpu"],
                             capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT)
    assert offline.returncode == 0 and "no-index" in offline.stdout and engine_env.read_probe(offline.stdout) == []
    assert engine_env.read_probe("no summary here") == []


def answer_the_question(button_text: str, questions: list[str]) -> None:
    """When the dialog's next question opens (a modal QMessageBox), record its text and click `button_text`."""
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication, QMessageBox

    def look() -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            QTimer.singleShot(50, look)
            return
        questions.append(box.text())
        next(button for button in box.buttons() if button.text() == button_text).click()

    QTimer.singleShot(50, look)


@pytest.fixture
def local_index(tmp_path, wheels, local_server, monkeypatch):
    """PIP_INDEX_URL at a live local index (a folder listing per project, as pip reads it) holding the probe
    wheel; no proxy, no pip.conf."""
    folder = tmp_path / "index" / "treeseg-probe"
    folder.mkdir(parents=True)
    shutil.copy(next(wheels.glob("*.whl")), folder)

    class Index(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "index"), **kwargs)

        def log_message(self, *args):
            pass

    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    address = local_server(Index) + "/"
    monkeypatch.setenv("PIP_INDEX_URL", address)
    return address


@pytest.mark.parametrize(("answer", "dead"), [("Stop", "torch"), ("Go on without it", "torch"),
                                              ("Go on without it", "extra")])
def test_an_unreachable_extra_index_is_a_choice_go_on_without_it_or_stop(qgis_app, tmp_path, wheels, local_index,
                                                                         test_setting, monkeypatch, answer, dead):
    """The torch index, or an extra index of the user's own (PIP_EXTRA_INDEX_URL here), does not answer."""
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.No)
    root = engine_env.engines_dir(tmp_path)
    old = previous_engine(root)
    if dead == "extra":
        monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/extra")
    dialog = EngineSetupDialog(root)
    dialog.torch_index.setText("http://127.0.0.1:9/whl/cpu" if dead == "torch" else "")
    ready, questions = [], []
    dialog.engine_ready.connect(ready.append)

    answer_the_question(answer, questions)
    dialog.install_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    log, status = dialog.log.toPlainText(), dialog.status_label.text()
    assert len(questions) == 1, log
    if dead == "torch":
        assert questions[0].startswith("The torch index http://127.0.0.1:9/whl/cpu could not be reached: the "
                                       "connection was refused."), questions[0]
        assert f"your other package indexes ({local_index}) and looks for torch there" in questions[0]
    else:
        assert questions[0].startswith("The extra index http://127.0.0.1:9/extra (PIP_EXTRA_INDEX_URL) could not be "
                                       "reached: the connection was refused."), questions[0]
        assert questions[0].endswith("Or stop, and correct pip's settings.")
    assert f"your other package indexes ({local_index})" in questions[0]
    if answer == "Stop":
        assert status.startswith("Stopped: the torch index could not be reached. Correct the torch index or empty "
                                 "it, then Install."), status
        assert ready == [] and "== Installing" not in log
        assert dialog.torch_index.text() == "http://127.0.0.1:9/whl/cpu"
        wait_until(lambda: sorted(path.name for path in root.iterdir()) == [old.folder.name], DIALOG_TIMEOUT)
    else:
        new = engine_env.engine_in_use(root, [PROBE_REQUIREMENT])
        assert new is not None and ready == [str(new.python)], status + log
        after = log.split("== Going on without http://127.0.0.1:9/")[1].split("\n", 1)[1]
        assert "--extra-index-url" not in after and "127.0.0.1:9/" not in after
        assert dialog.torch_index.text() == ""
    dialog.deleteLater()


def test_after_make_deploy_the_dialog_names_the_engine_in_use_and_install_is_not_the_default(
        qgis_app, tmp_path, test_setting, monkeypatch):
    """`make deploy` records the checkout's .venv in engine_python.txt: the panel runs on it, so the dialog
    says so (not '(no engine installed)') and Enter does not start an install."""
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    pointer = tmp_path / "plugin" / "treeseg_qgis" / "engine_python.txt"
    pointer.parent.mkdir(parents=True)
    pointer.write_text(sys.executable + "\n")
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", pointer)
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", pointer.parent)
    monkeypatch.delenv(engine_client.ENGINE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])

    dialog = EngineSetupDialog(engine_env.engines_dir(tmp_path))

    assert "no engine installed" not in dialog.folder_label.text()
    assert "none made here; TreeSeg runs on the engine below" in dialog.folder_label.text()
    assert dialog.engine_label.text() == f"{sys.executable} (recorded by make deploy in engine_python.txt)"
    assert not dialog.install_button.autoDefault() and not dialog.install_button.isDefault()
    dialog.deleteLater()

    pointer.unlink()
    bare = EngineSetupDialog(engine_env.engines_dir(tmp_path))
    assert "(no engine installed)" in bare.folder_label.text() and bare.engine_label.text() == "none"
    assert bare.install_button.autoDefault()
    bare.deleteLater()


def test_an_engine_from_another_python_shows_as_needing_install(qgis_app, tmp_path, test_setting, monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", tmp_path / "none.txt")
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", tmp_path / "plugin" / "treeseg_qgis")
    monkeypatch.delenv(engine_client.ENGINE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])
    root = engine_env.engines_dir(tmp_path)
    stale = make_marked_engine(root, [PROBE_REQUIREMENT], "3.9")
    stale.python.chmod(0o755)

    dialog = EngineSetupDialog(root)

    assert find_engine_python(None) is None and dialog.private_engine() is None
    assert dialog.install_button.isEnabled() and not dialog.repair_button.isEnabled()
    assert not dialog.remove_button.isEnabled() and not dialog.status_label.text().startswith("Ready")
    assert (f"installed: {stale.folder.name}, made from Python 3.9, but QGIS now runs Python "
            f"{engine_env.PYTHON_VERSION}: it cannot be used; Install makes a new one") in dialog.folder_label.text()
    assert dialog.retry_button() == "Install" and dialog.engine_label.text() == "none"
    dialog.deleteLater()


def test_a_hand_edited_marker_is_one_line_in_the_dialog_and_install_is_off(qgis_app, tmp_path, test_setting,
                                                                          monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch==2.13.0\nscikit-image==0.25.2; python_version >= 3.13\n")
    monkeypatch.setattr(engine_env, "requirements_file", lambda: requirements)

    dialog = EngineSetupDialog(engine_env.engines_dir(tmp_path))

    assert dialog.base_label.text().startswith("requirements.txt line 2 (scikit-image==0.25.2; python_version >= "
                                               "3.13): the marker is malformed")
    assert "\n" not in dialog.base_label.text()
    assert not dialog.install_button.isEnabled() and not dialog.repair_button.isEnabled()
    dialog.deleteLater()


def test_folders_a_killed_set_up_left_are_offered_for_deletion_with_their_size(qgis_app, tmp_path, test_setting):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    root = engine_env.engines_dir(tmp_path)
    staging = root / "staging-cpu-0123456789"
    fake_files(staging, "bin/python")
    (staging / "torch.so").write_bytes(b"\0" * 41 * 1024**2)
    (root / "old-engine-cpu-1").mkdir()

    dialog = EngineSetupDialog(root)

    assert dialog.leftover_row.isVisibleTo(dialog) and dialog.leftover_button.isEnabled()
    assert dialog.leftover_label.text() == ("Left by a set-up that did not finish, never used: old-engine-cpu-1 "
                                            "(0 MB), staging-cpu-0123456789 (41 MB).")
    dialog.leftover_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert list(root.iterdir()) == [] and not dialog.leftover_row.isVisibleTo(dialog)
    assert dialog.status_label.text() == "Deleted old-engine-cpu-1, staging-cpu-0123456789."
    dialog.deleteLater()
    empty = EngineSetupDialog(engine_env.engines_dir(tmp_path / "empty"))
    assert not empty.leftover_row.isVisibleTo(empty)
    empty.deleteLater()


def test_a_dead_proxy_is_named_before_pip_runs_and_repair_is_the_button_named(qgis_app, tmp_path, local_index,
                                                                               test_setting, monkeypatch):
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None, python_version=None: [PROBE_REQUIREMENT])
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    root = engine_env.engines_dir(tmp_path)
    current = make_marked_engine(root, [PROBE_REQUIREMENT])
    current.python.unlink()
    current.python.symlink_to(sys.executable)
    dialog = EngineSetupDialog(root)
    dialog.torch_index.setText("")
    assert not dialog.install_button.isEnabled() and dialog.retry_button() == "Repair"

    dialog.repair_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    status = dialog.status_label.text()
    assert f"{local_index} (PIP_INDEX_URL): the proxy http://127.0.0.1:9: the connection was refused" in status, status
    assert "then Repair." in status and "Install" not in status
    assert "== Installing" not in dialog.log.toPlainText()
    wait_until(lambda: sorted(path.name for path in root.iterdir()) == [current.folder.name], DIALOG_TIMEOUT)
    assert engine_env.engine_in_use(root, [PROBE_REQUIREMENT]) == current
    dialog.deleteLater()


def test_going_on_without_a_dead_extra_index_of_the_users_keeps_the_others(tmp_path):
    checks = [engine_env.IndexCheck(engine_env.PYPI, "PyPI, pip's default index"),
              engine_env.IndexCheck("https://live.example/simple", "PIP_EXTRA_INDEX_URL", extra=True),
              engine_env.IndexCheck("https://dead.example/simple", "PIP_EXTRA_INDEX_URL",
                                    problem="no answer within 5 s", extra=True)]

    assert engine_env.probe_status(checks) == engine_env.PROBE_EXTRA_UNREACHABLE
    assert engine_env.probe_status([replace(checks[0], problem="refused"), *checks[1:]]) == (
        engine_env.PROBE_INDEX_UNREACHABLE)
    torch_index, kept = engine_env.without_dead_extras(checks, "https://download.pytorch.org/whl/cpu")
    assert (torch_index, kept) == ("https://download.pytorch.org/whl/cpu", ["https://live.example/simple"])
    assert engine_env.stopped_message(checks, "Install") == (
        "Stopped: https://dead.example/simple (PIP_EXTRA_INDEX_URL) could not be reached. Correct the address, or "
        "pip's settings, then Install.")
    choice = engine_env.extra_index_choice(checks, "torch==2.13.0+cpu")
    assert "torch==2.13.0+cpu" not in choice and "Go on without it: pip then uses your other package indexes" in choice

    root = engine_env.engines_dir(tmp_path)
    plan = engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU, torch_index, None, kept)
    pip = plan.steps[3]
    assert pip.environment == (("PIP_EXTRA_INDEX_URL", "https://live.example/simple"),)
    assert engine_env.step_environment(pip, {"PIP_EXTRA_INDEX_URL": "https://dead.example/simple"})[
        "PIP_EXTRA_INDEX_URL"] == "https://live.example/simple"
    none_left = engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU, "", None, []).steps[3]
    assert none_left.environment == (("PIP_EXTRA_INDEX_URL", " "),)
    assert engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU).steps[3].environment == ()
