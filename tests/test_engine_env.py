"""The engine's private environment: QGIS's interpreter found on each platform's layout, the plan and its
keying, a real engine built aside offline from a local wheel and checked, the worker spoken to through it, and
the set-up dialog running the same commands through QProcess (install, cancel at each step, a dead index)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from treeseg_qgis import __version__
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
    patch.setattr(engine_env, "engine_requirements", lambda path=None: [PROBE_REQUIREMENT])
    patch.setenv("PIP_NO_INDEX", "1")
    patch.setenv("PIP_FIND_LINKS", str(wheels))


def run_plan(plan: engine_env.Plan) -> None:
    for step in plan.steps:
        result = subprocess.run(step.command, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                                env=engine_env.process_environment(os.environ))
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
    assert commands[:4] == [
        ("/usr/bin/python3.11", "-m", "venv", "--clear", "--system-site-packages", str(plan.staging)),
        ("/usr/bin/python3.11", "-c", engine_env.QGIS_VERSIONS_SCRIPT, constraints),
        (python, "-m", "pip", "install", "--extra-index-url", "https://download.pytorch.org/whl/cpu",
         "--constraint", constraints, *pins, "numpy", "scipy", "matplotlib"),
        (python, "-c", engine_env.ENGINE_CHECK, str(REPO)),
    ]
    assert commands[4][:2] == ("/usr/bin/python3.11", "-c") and commands[4][3:5] == (str(plan.staging),
                                                                                     str(plan.target))
    assert [step.swaps_engine for step in plan.steps] == [False, False, False, False, True]
    assert not any("--index-url" in command for command in commands)
    cuda = engine_env.install_plan(root, "/usr/bin/python3.11", "cu130").steps[2]
    assert "https://download.pytorch.org/whl/cu130" in cuda.command and "torch (CUDA, cu130)" in cuda.title
    mirror = engine_env.install_plan(root, "/usr/bin/python3.11", engine_env.CPU, torch_index="").steps[2]
    assert "--extra-index-url" not in mirror.command


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
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None: ["torch==2.13.0"])
    assert engine_env.private_engine_python(tmp_path) == str(current.python)


def make_marked_engine(root: Path, requirements: list[str]) -> engine_env.Engine:
    """An engine folder with an interpreter file and the ready marker (what the swap writes)."""
    key = engine_env.engine_key(requirements, engine_env.CPU)
    folder = root / f"engine-{key}"
    python = engine_env.venv_python(folder)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (folder / engine_env.READY_MARKER).write_text(json.dumps({"key": key, "build": "cpu",
                                                              "requirements": requirements}))
    return engine_env.Engine(folder, key, "cpu", tuple(requirements))


@pytest.mark.parametrize(("log", "words"), [
    ("OSError: [Errno 28] No space left on device", "disk is full"),
    ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno 111] Connection "
     "refused')\nERROR: No matching distribution found for torch==2.13.0", "could not be reached"),
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


def test_pip_progress_moves_with_the_packages_and_megabytes():
    progress = engine_env.PipProgress()
    assert progress.fraction() == 0.0

    progress.feed("Collecting torch==2.13.0\n  Downloading https://x/torch-2.13.0-cp311.whl (200.5 MB)\n"
                  "Collecting transformers==5.24.0\n  Downloading transformers-5.24.0-py3-none-any.whl (12")
    first = progress.fraction()
    progress.feed(".0 MB)\n  Downloading tqdm-4.0-py3-none-any.whl (512 kB)\n")

    assert progress.packages == 2 and progress.megabytes == pytest.approx(213.0)
    assert 0 < first == progress.fraction() < 0.8
    assert progress.describe() == "2 packages, 213 MB to download; now tqdm-4.0-py3-none-any.whl"
    progress.feed("Installing collected packages: torch, transformers\n")
    assert progress.fraction() == 0.9 and progress.describe().endswith("installing them")


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
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None: ["torch==2.13.0"])
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
        assert panel.engine is plugin.engine and panel.run_button.isEnabled()
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
    assert dialog.engine_label.text() == str(new.python)

    dialog.repair_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [str(new.python)] * 2 and stops == [True], dialog.log.toPlainText()
    assert engine_env.ready_engines(root) == [new] and sorted(path.name for path in root.iterdir()) == [new.folder.name]

    dialog.remove_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert removed == [True] and stops == [True, True] and not new.folder.exists()
    assert dialog.install_button.isEnabled() and not dialog.remove_button.isEnabled()
    dialog.deleteLater()


@pytest.mark.parametrize("step", [0, 1, 2, 3])
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
    assert engine_env.ready_engines(root) == [old] and not dialog.plan
    assert sorted(path.name for path in root.iterdir()) == [old.folder.name]
    assert dialog.process is None and not dialog.cancel_button.isEnabled()
    assert "made for other package versions" in dialog.folder_label.text()
    dialog.deleteLater()


def test_a_dead_index_is_explained_in_words_within_a_minute(qgis_app, tmp_path, wheels, test_setting, monkeypatch):
    import time

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

    started = time.monotonic()
    dialog.install_button.click()
    wait_until(lambda: not dialog.running, 90.0)
    elapsed = time.monotonic() - started

    status = dialog.status_label.text()
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert "could not be reached" in status and f"the engine in use is still {old.python}" in status, status
    assert "127.0.0.1:9" in dialog.log.toPlainText()
    assert engine_env.ready_engines(root) == [old] and sorted(p.name for p in root.iterdir()) == [old.folder.name]
    dialog.deleteLater()


def test_an_unchanged_set_of_pins_reuses_the_engine_after_a_plugin_upgrade(qgis_app, tmp_path, test_setting,
                                                                            monkeypatch):
    from treeseg_qgis.qgis_side.gui import engine_setup
    from treeseg_qgis.qgis_side.gui.engine_setup import EngineSetupDialog

    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.setattr(engine_env, "engine_requirements", lambda path=None: [PROBE_REQUIREMENT])
    root = engine_env.engines_dir(tmp_path)
    engine = make_marked_engine(root, [PROBE_REQUIREMENT])
    engine.python.chmod(0o755)
    monkeypatch.setattr(engine_setup, "__version__", "9.9.9")

    dialog = EngineSetupDialog(root)

    assert find_engine_python(None) == str(engine.python)
    assert not dialog.install_button.isEnabled() and dialog.repair_button.isEnabled()
    assert f"installed: {engine.folder.name} (cpu)" in dialog.folder_label.text()
    assert dialog.status_label.text().startswith(f"Ready: {engine.folder.name} was made for exactly these packages")
    assert dialog.packages_label.text() == f"TreeSeg 9.9.9 pins {PROBE_REQUIREMENT}"
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
    assert "lacks what the TreeSeg engine needs: torch" in dialog.log.toPlainText()
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
