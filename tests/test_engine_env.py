"""The engine's private environment: the commands for each choice, a real environment made offline from a
local wheel, the worker spoken to through it, and the set-up dialog running the same commands through QProcess."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from treeseg_qgis import __version__, engine_client, engine_env
from treeseg_qgis.engine_client import ENGINE_PYTHON_ENV, EngineClient, find_engine_python

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
    """The plans install the probe wheel from `wheels` instead of the engine packages from the indexes."""
    patch.setattr(engine_env, "engine_requirements", lambda path=None: [PROBE_REQUIREMENT])
    patch.setattr(engine_env, "index_options", lambda build: ["--no-index", "--find-links", str(wheels)])


@pytest.fixture(scope="module")
def made_environment(tmp_path_factory, wheels) -> Path:
    """A real environment made by the install plan's commands, run one after the other."""
    venv_dir = engine_env.engine_venv_dir(tmp_path_factory.mktemp("profile"), "test")
    with pytest.MonkeyPatch.context() as patch:
        install_offline(patch, wheels)
        steps = engine_env.install_plan(venv_dir, engine_env.find_base_python(), engine_env.CPU)
    for step in steps:
        result = subprocess.run(step.command, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                                env=engine_env.process_environment(os.environ))
        assert result.returncode == 0, f"{step.title}:\n{result.stdout}\n{result.stderr}"
    return venv_dir


def test_the_environment_lives_in_the_profile_one_per_version():
    assert engine_env.engine_venv_dir("/home/u/profiles/default/") == \
        Path(f"/home/u/profiles/default/treeseg/engine-{__version__}")
    assert engine_env.venv_python(Path("/e"), windows=False) == Path("/e/bin/python")
    assert engine_env.venv_python(Path("/e"), windows=True) == Path("/e/Scripts/python.exe")


def test_the_cpu_plan_makes_a_venv_from_qgis_python_and_takes_torch_from_the_cpu_index(tmp_path):
    venv_dir = engine_env.engine_venv_dir(tmp_path)
    python, constraints = str(engine_env.venv_python(venv_dir)), str(venv_dir / "qgis-constraints.txt")

    steps = engine_env.install_plan(venv_dir, "/usr/bin/python3.11", engine_env.CPU)

    assert [step.command for step in steps] == [
        ("/usr/bin/python3.11", "-m", "venv", "--system-site-packages", str(venv_dir)),
        ("/usr/bin/python3.11", "-c", engine_env.QGIS_VERSIONS_SCRIPT, constraints),
        (python, "-m", "pip", "install", "--index-url", "https://download.pytorch.org/whl/cpu",
         "--extra-index-url", "https://pypi.org/simple", "--constraint", constraints,
         *engine_env.engine_requirements(), "numpy", "scipy", "matplotlib"),
        (python, "-c", engine_env.ENGINE_CHECK),
    ]
    assert "torch (CPU)" in steps[2].title


def test_the_cuda_plan_takes_torch_from_the_pytorch_index_of_its_build(tmp_path):
    steps = engine_env.install_plan(engine_env.engine_venv_dir(tmp_path), "/usr/bin/python3.11", "cu130")

    install = steps[2].command
    assert install[install.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu130"
    assert install[install.index("--extra-index-url") + 1] == "https://pypi.org/simple"
    assert "torch (CUDA, cu130)" in steps[2].title


def test_repair_reinstalls_the_engine_packages_but_never_qgis_numpy(tmp_path):
    venv_dir = engine_env.engine_venv_dir(tmp_path)
    install = engine_env.install_plan(venv_dir, "/usr/bin/python3.11", engine_env.CPU)

    repair = engine_env.install_plan(venv_dir, "/usr/bin/python3.11", engine_env.CPU, repair=True)

    assert len(repair) == len(install) + 1
    assert [step.command for step in repair[:2]] == [step.command for step in install[:2]]
    assert [step.command for step in repair[3:]] == [step.command for step in install[2:]]
    reinstall = repair[2].command
    assert reinstall[:3] == (str(engine_env.venv_python(venv_dir)), "-m", "pip")
    assert {"--force-reinstall", "--no-deps", "--constraint"} <= set(reinstall)
    assert reinstall[-len(engine_env.ENGINE_PACKAGES):] == tuple(engine_env.engine_requirements())
    assert not {"numpy", "scipy"} & {part.split("==")[0] for part in reinstall}


def test_the_requirements_are_those_requirements_txt_pins(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# engine\ntorch==2.13.0  # CPU\nTransformers==5.24.0\nscikit_learn==1.9.1\n"
                            "huggingface-hub==2.4.0\npytest==8.*\nsafetensors\n")

    assert engine_env.engine_requirements(requirements) == [
        "torch==2.13.0", "Transformers==5.24.0", "scikit_learn==1.9.1", "scikit-image", "huggingface-hub==2.4.0",
        "safetensors"]
    pinned = engine_env.engine_requirements(REPO / "requirements.txt")
    assert engine_env.engine_requirements() == pinned
    assert pinned[0].startswith("torch==") and pinned[1].startswith("transformers==")


def test_an_existing_python_is_checked_for_everything_the_engine_imports():
    command = engine_env.check_command("/opt/env/bin/python")

    assert command == ("/opt/env/bin/python", "-c", engine_env.ENGINE_CHECK)
    for module in ("torch", "transformers", "sklearn", "skimage", "osgeo.gdal"):
        assert f'"{module}"' in engine_env.ENGINE_CHECK


def test_gpus_are_read_from_nvidia_smi_and_the_driver_picks_the_cuda_build():
    output = "NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06\n\nNVIDIA GeForce RTX 3060, 12288 MiB, 535.183.01\n"

    assert engine_env.parse_gpus(output) == [engine_env.Gpu("NVIDIA H100 80GB HBM3", 81559, "580.65.06"),
                                             engine_env.Gpu("NVIDIA GeForce RTX 3060", 12288, "535.183.01")]
    assert engine_env.GPU_QUERY == ("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader")
    assert [engine_env.cuda_build(driver) for driver in ("580.65.06", "535.183.01", "525.60.13", "470.256.02",
                                                         "[N/A]")] == ["cu130", "cu126", "cu126", None, None]


def test_the_base_python_is_the_one_qgis_runs_on_and_never_qgis_itself(monkeypatch, tmp_path):
    qgis_binary = tmp_path / "qgis"
    qgis_binary.write_text("")
    monkeypatch.setattr(sys, "executable", str(qgis_binary))
    monkeypatch.setattr(sys, "_base_executable", str(qgis_binary))

    candidates = engine_env.base_python_candidates()

    assert str(qgis_binary) not in candidates
    assert all(Path(candidate).name.startswith("python") for candidate in candidates)
    found = engine_env.find_base_python()
    version = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version == str(sys.version_info[:2])


def test_a_python_without_venv_gets_an_instruction(tmp_path):
    without_venv = tmp_path / "python3"
    without_venv.write_text(f"#!/bin/sh\necho {sys.version_info.major}.{sys.version_info.minor}\n"
                            "echo 'No module named ensurepip' >&2\nexit 1\n")
    without_venv.chmod(without_venv.stat().st_mode | stat.S_IEXEC)

    with pytest.raises(engine_env.EngineEnvError, match="install python3-venv"):
        engine_env.find_base_python([str(without_venv)])
    with pytest.raises(engine_env.EngineEnvError, match="No Python"):
        engine_env.find_base_python([])


def test_remove_deletes_only_an_engine_environment(tmp_path):
    venv_dir = engine_env.engine_venv_dir(tmp_path, "test")
    (venv_dir / "bin").mkdir(parents=True)
    other = tmp_path / "documents"
    other.mkdir()

    with pytest.raises(engine_env.EngineEnvError, match="not an engine environment"):
        engine_env.remove_environment(other)
    engine_env.remove_environment(venv_dir)

    assert other.is_dir() and not venv_dir.exists()


def test_a_real_environment_is_made_offline_and_qgis_python_is_untouched(made_environment):
    python = engine_env.venv_python(made_environment)
    base = engine_env.find_base_python()
    import numpy
    import scipy

    versions = subprocess.run([str(python), "-c", f"import {PROBE}, numpy; print({PROBE}.VERSION, numpy.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()

    assert versions == ["1.0", numpy.__version__]
    assert (made_environment / "qgis-constraints.txt").read_text().split() == [f"numpy=={numpy.__version__}",
                                                                               f"scipy=={scipy.__version__}"]
    assert subprocess.run([base, "-c", f"import {PROBE}"], capture_output=True).returncode != 0


def test_the_worker_speaks_its_protocol_through_the_made_environment(made_environment):
    python = str(engine_env.venv_python(made_environment))
    client = EngineClient(python)
    try:
        record = client.probe()
        assert client._process.args[0] == python
    finally:
        client.close()

    assert record["treeseg"] == __version__ and record["torch"].startswith("2.") and record["device"] == "cpu"


def test_the_private_environment_is_found_after_the_setting_and_the_variable(qgis_app, tmp_path, monkeypatch):
    from qgis.core import QgsApplication

    assert engine_client.qgis_profile_dir() == QgsApplication.qgisSettingsDirPath()
    python = engine_env.venv_python(engine_env.engine_venv_dir(tmp_path))
    python.parent.mkdir(parents=True)
    python.write_text("")
    python.chmod(0o755)
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(tmp_path))
    monkeypatch.delenv(ENGINE_PYTHON_ENV, raising=False)

    assert find_engine_python(None) == str(python)
    assert find_engine_python(sys.executable) == sys.executable
    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    assert find_engine_python(None) == sys.executable


@pytest.fixture
def test_setting(monkeypatch):
    """The dialog reads and writes a throw-away setting instead of the real engine setting."""
    from qgis.core import QgsSettings

    from treeseg_qgis.gui import engine_setup

    monkeypatch.setattr(engine_setup, "ENGINE_PYTHON_SETTING", TEST_SETTING)
    QgsSettings().remove(TEST_SETTING)
    yield TEST_SETTING
    QgsSettings().remove(TEST_SETTING)


def test_the_plugin_without_an_engine_offers_the_set_up_and_uses_the_new_engine_at_once(
        qgis_iface, qgis_new_project, tmp_path, monkeypatch):
    from treeseg_qgis import classFactory
    from treeseg_qgis import plugin as plugin_module
    from treeseg_qgis.plugin import MENU

    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(nowhere / "python"))
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", nowhere / "treeseg_qgis")
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", nowhere / "engine_python.txt")
    monkeypatch.setattr(engine_client, "qgis_profile_dir", lambda: str(nowhere))
    monkeypatch.setattr(plugin_module, "ENGINE_PYTHON_SETTING", "treeseg_tests/no_such_setting")
    main_window = qgis_iface.mainWindow()
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    setup_action = plugin.setup_action
    try:
        dock = plugin.dock
        assert plugin.engine is None and not dock.run_button.isEnabled()
        assert dock.setup_button.isVisibleTo(dock)
        qgis_iface.addPluginToRasterMenu.assert_any_call(MENU, setup_action)

        dock.setup_button.click()
        dialog = plugin.setup_dialog
        assert dialog is not None and dialog.isVisible()
        setup_action.trigger()
        assert plugin.setup_dialog is dialog

        dialog.engine_ready.emit(sys.executable)
        assert plugin.engine is not None and plugin.engine.python == sys.executable
        assert dock.engine is plugin.engine and dock.run_button.isEnabled()
        assert not dock.setup_button.isVisibleTo(dock) and dock.engine_label.text().startswith("Engine: ")

        broken = tmp_path / "broken" / "python"
        broken.parent.mkdir()
        broken.write_text("#!/bin/sh\nexit 3\n")
        broken.chmod(0o755)
        main_window.show()
        plugin.action.trigger()
        dialog.engine_ready.emit(str(broken))
        wait_until(lambda: "not usable" in dock.engine_label.text(), DIALOG_TIMEOUT)
        assert dock.setup_button.isVisible() and plugin.engine.python == str(broken)
    finally:
        plugin.unload()
        main_window.hide()
    assert plugin.setup_dialog is None and plugin.setup_action is None
    qgis_iface.removePluginRasterMenu.assert_any_call(MENU, setup_action)


def test_the_dialog_installs_repairs_and_removes_through_qprocess(qgis_app, tmp_path, wheels, test_setting,
                                                                  monkeypatch):
    from qgis.core import QgsSettings
    from qgis.PyQt.QtWidgets import QMessageBox

    from treeseg_qgis.gui.engine_setup import EngineSetupDialog

    install_offline(monkeypatch, wheels)
    monkeypatch.setattr(engine_env, "ENGINE_CHECK", f"import {PROBE}; print('probe', {PROBE}.VERSION)")
    QgsSettings().setValue(test_setting, "/somewhere/else/python")
    venv_dir = engine_env.engine_venv_dir(tmp_path, "test")
    python = str(engine_env.venv_python(venv_dir))
    dialog = EngineSetupDialog(venv_dir)
    ready, stops, removed = [], [], []
    dialog.engine_ready.connect(ready.append)
    dialog.stop_engine_requested.connect(lambda: stops.append(True))
    dialog.engine_removed.connect(lambda: removed.append(True))
    assert dialog.install_button.isEnabled() and not dialog.repair_button.isEnabled()

    dialog.install_button.click()
    assert dialog.running and dialog.cancel_button.isEnabled() and not dialog.install_button.isEnabled()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    log = dialog.log.toPlainText()
    assert ready == [python], dialog.status_label.text() + log
    assert dialog.status_label.text().startswith("The engine is ready")
    assert "probe 1.0" in log and "== Creating the virtual environment" in log
    assert dialog.progress_bar.value() == dialog.progress_bar.maximum() == 4
    assert not dialog.install_button.isEnabled() and dialog.repair_button.isEnabled()
    assert QgsSettings().value(test_setting, "", type=str) == "" and stops == []

    dialog.repair_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert ready == [python, python] and stops == [True], dialog.log.toPlainText()
    assert "--force-reinstall" in dialog.log.toPlainText()

    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    dialog.remove_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)
    assert removed == [True] and stops == [True, True] and not venv_dir.exists()
    assert dialog.install_button.isEnabled() and not dialog.remove_button.isEnabled()
    dialog.deleteLater()


def test_cancel_stops_the_running_command(qgis_app, tmp_path, wheels, test_setting, monkeypatch):
    from treeseg_qgis.gui.engine_setup import SET_UP_CANCELLED, EngineSetupDialog

    install_offline(monkeypatch, wheels)
    venv_dir = engine_env.engine_venv_dir(tmp_path, "test")
    dialog = EngineSetupDialog(venv_dir)
    ready = []
    dialog.engine_ready.connect(ready.append)

    dialog.install_button.click()
    wait_until(lambda: venv_dir.exists(), DIALOG_TIMEOUT)
    dialog.cancel_button.click()
    wait_until(lambda: not dialog.running, DIALOG_TIMEOUT)

    assert ready == [] and dialog.status_label.text() == SET_UP_CANCELLED
    assert dialog.progress_bar.value() == 0 and "Holding numpy" not in dialog.log.toPlainText()
    assert dialog.process is None and not dialog.cancel_button.isEnabled() and dialog.remove_button.isEnabled()
    dialog.deleteLater()


def test_an_existing_python_is_checked_before_it_is_used(qgis_app, tmp_path, test_setting):
    from qgis.core import QgsSettings

    from treeseg_qgis.gui.engine_setup import EngineSetupDialog

    dialog = EngineSetupDialog(engine_env.engine_venv_dir(tmp_path, "test"))
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
    from treeseg_qgis.gui.engine_setup import EngineSetupDialog

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    dialog = EngineSetupDialog(engine_env.engine_venv_dir(tmp_path, "test"))
    wait_until(lambda: dialog.build_combo.count() == 2, DIALOG_TIMEOUT)

    assert dialog.build_combo.currentData() == "cu130"
    assert dialog.build_combo.currentText() == "CUDA (cu130): NVIDIA H100 80GB HBM3, 80 GB"
    assert dialog.build_combo.itemData(0) == engine_env.CPU
    dialog.deleteLater()
