"""The plugin as QGIS loads it: classFactory, initProcessing/initGui, unload; with and without the engine."""

from __future__ import annotations

import os
import subprocess
import sys

from treeseg_qgis.qgis_side.engine_client import ENGINE_PYTHON_ENV

from .conftest import REPO
from .test_gui import load_scaled, wait_until

PROBE_TIMEOUT = 120.0

TORCH_FREE_CHECK = """
import sys
from unittest.mock import MagicMock

from qgis.core import QgsApplication
from qgis.gui import QgsMessageBar
from qgis.PyQt.QtWidgets import QMainWindow

app = QgsApplication([], True)
app.initQgis()
window = QMainWindow()
window.show()
iface = MagicMock()
iface.mainWindow.return_value = window
iface.activeLayer.return_value = None
iface.messageBar.return_value = QgsMessageBar()

import treeseg_qgis

plugin = treeseg_qgis.classFactory(iface)
plugin.initGui()
plugin.action.trigger()
while plugin.dock.run_panel.engine_label.text().startswith("Engine: start"):
    app.processEvents()
print(plugin.dock.run_panel.engine_label.text())
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "sklearn"}))
print(sorted(name for name in sys.modules if name.startswith("treeseg_qgis.engine.core")))
plugin.unload()
app.exitQgis()
"""


def test_the_plugin_adds_and_removes_its_button_menu_panel_and_provider(qgis_iface, qgis_new_project, monkeypatch):
    from qgis.core import QgsApplication
    from qgis.gui import QgsDockWidget

    from treeseg_qgis import classFactory
    from treeseg_qgis.qgis_side.plugin import MENU

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    registry = QgsApplication.processingRegistry()
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    action, dock = plugin.action, plugin.dock
    menu_actions = [action, plugin.setup_action, plugin.models_action]

    assert registry.providerById("treeseg") is plugin.provider
    assert registry.algorithmById("treeseg:segmenttrees") is not None
    assert isinstance(dock, QgsDockWidget) and dock.isHidden() and dock.run_panel.run_button.isEnabled()
    assert not action.icon().isNull() and action.isCheckable()
    assert [call.args for call in qgis_iface.addPluginToRasterMenu.call_args_list] == [
        (MENU, menu_action) for menu_action in menu_actions]
    assert [menu_action.text() for menu_action in menu_actions[1:]] == ["Set up the engine…", "Models…"]
    action.trigger()
    assert not dock.isHidden()

    plugin.unload()

    assert registry.providerById("treeseg") is None
    removed = [call.args for call in qgis_iface.removePluginRasterMenu.call_args_list]
    assert len(removed) == 3 and all((MENU, menu_action) in removed for menu_action in menu_actions)
    assert plugin.dock is None and plugin.action is None and plugin.engine is None


def test_qgis_process_gets_the_provider_without_any_gui(qgis_iface, qgis_new_project):
    from qgis.core import QgsApplication

    from treeseg_qgis import classFactory

    plugin = classFactory(qgis_iface)
    plugin.initProcessing()

    assert QgsApplication.processingRegistry().providerById("treeseg") is plugin.provider
    assert plugin.dock is None and plugin.action is None and plugin.engine is None
    qgis_iface.addPluginToRasterMenu.assert_not_called()
    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("treeseg") is None


def test_the_panel_shows_the_engine_device_and_unload_stops_the_worker(qgis_iface, qgis_new_project, monkeypatch):
    from treeseg_qgis import classFactory

    monkeypatch.setenv(ENGINE_PYTHON_ENV, sys.executable)
    main_window = qgis_iface.mainWindow()
    main_window.show()
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    plugin.action.trigger()
    try:
        assert plugin.dock.run_panel.engine_label.text() == "Engine: starting…"
        wait_until(lambda: not plugin.dock.run_panel.engine_label.text().startswith("Engine: start"), PROBE_TIMEOUT)
        engine = plugin.dock.run_panel.engine_label.text()
        assert engine.startswith("Engine: CPU (") and "torch 2." in engine
        worker = plugin.engine._process
        assert worker.poll() is None
    finally:
        plugin.unload()
        main_window.hide()
    assert worker.poll() is not None


def test_without_the_engine_the_panel_explains_and_run_is_disabled(qgis_iface, qgis_new_project, tmp_path,
                                                                    monkeypatch):
    from qgis.core import QgsApplication

    from treeseg_qgis import classFactory
    from treeseg_qgis.qgis_side import engine_client

    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv(ENGINE_PYTHON_ENV, str(nowhere / "python"))
    monkeypatch.setattr(engine_client, "PLUGIN_DIR", nowhere / "treeseg_qgis")
    monkeypatch.setattr(engine_client, "ENGINE_POINTER_FILE", nowhere / "engine_python.txt")
    monkeypatch.setattr(engine_client, "ENGINE_PYTHON_SETTING", "treeseg_tests/no_such_setting")
    plugin = classFactory(qgis_iface)
    plugin.initGui()
    try:
        dock = plugin.dock
        assert plugin.engine is None
        assert not dock.run_panel.run_button.isEnabled() and not dock.run_panel.cancel_button.isEnabled()
        assert engine_client.missing_engine_message() in dock.run_panel.engine_label.text()
        dock.run_panel.run_button.click()
        plugin.action.trigger()
        assert dock.run_panel.task is None and QgsApplication.processingRegistry().providerById("treeseg") is not None
    finally:
        plugin.unload()


def test_loading_the_plugin_and_opening_the_panel_never_imports_torch():
    """In a fresh QGIS process (pytest's own process has torch loaded by other tests)."""
    output = subprocess.run([sys.executable, "-c", TORCH_FREE_CHECK], cwd=REPO, capture_output=True, text=True,
                            timeout=load_scaled(PROBE_TIMEOUT), env=dict(os.environ, QT_QPA_PLATFORM="offscreen",
                                                            TREESEG_ENGINE_PYTHON=sys.executable))
    assert output.returncode == 0, output.stderr
    engine, engines_packages, core_modules = output.stdout.strip().splitlines()[-3:]
    assert engine.startswith("Engine: CPU (")
    assert engines_packages == "[]" and core_modules == "[]"
