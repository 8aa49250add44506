"""The panel as a new user first sees it: its width, the layer it follows, what a model override shows."""

from __future__ import annotations

import re
import sys

from treeseg_qgis.qgis_side.engine_client import EngineClient

from .test_gui import add_raster, clean_settings  # noqa: F401 - fixture

NEW_DOCK_WIDTH = 300
"""About the width QGIS gives a newly opened dock widget."""


def new_dock(qgis_iface):
    from treeseg_qgis.qgis_side.gui.dock import TreesegDock

    return TreesegDock(qgis_iface, EngineClient(sys.executable))


def test_the_panel_fits_a_new_dock_with_every_group_open(qgis_iface, qgis_new_project, clean_settings):  # noqa: F811
    from qgis.PyQt.QtWidgets import QStyle

    dock = new_dock(qgis_iface)
    panel = dock.run_panel
    assert dock.teach_panel.isCollapsed()  # nothing to teach before a run
    panel.extras_group.setCollapsed(False)
    panel.advanced_group.setCollapsed(False)
    dock.teach_panel.setCollapsed(False)
    scroll = dock.widget()
    scroll_bar = scroll.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
    frame = 2 * scroll.frameWidth()

    assert scroll.widget().minimumSizeHint().width() + scroll_bar + frame <= NEW_DOCK_WIDTH


def test_the_panel_follows_the_active_raster_until_one_is_picked(qgis_iface, qgis_new_project, clean_settings,  # noqa: F811
                                                                 scene_tif):
    path, _ = scene_tif
    first = add_raster(path, "first")
    qgis_iface.setActiveLayer(first)
    dock = new_dock(qgis_iface)
    panel = dock.run_panel
    assert panel.layer_combo.currentLayer() is first
    second = add_raster(path, "second")
    # pytest-qgis's interface does not emit currentLayerChanged; QGIS does, with the new active layer.
    qgis_iface.setActiveLayer(second)
    panel.run_input.follow_active_layer(qgis_iface.activeLayer())
    assert panel.layer_combo.currentLayer() is second
    panel.run_input.follow_active_layer(None)
    assert panel.layer_combo.currentLayer() is second

    panel.layer_combo.setLayer(first)
    panel.layer_combo.activated.emit(panel.layer_combo.currentIndex())  # what a user's choice emits
    panel.run_input.follow_active_layer(second)
    assert panel.layer_combo.currentLayer() is first


def test_an_override_greys_the_model_box_and_names_the_model_that_runs(qgis_iface, qgis_new_project,
                                                                       clean_settings, tiny_model_dir, monkeypatch):  # noqa: F811
    from treeseg_qgis.memory import estimate_peak_bytes, format_gigabytes
    from treeseg_qgis.qgis_side.gui import run_estimates
    from treeseg_qgis.qgis_side.gui.model_manager import MEMORY_COLUMN, ModelManagerDialog

    monkeypatch.setattr(run_estimates, "available_memory_bytes", lambda: 16 * 10**9)
    dock = new_dock(qgis_iface)
    panel = dock.run_panel
    panel.device_combo.setCurrentText("cpu")
    base = format_gigabytes(estimate_peak_bytes("base"))
    assert panel.model_combo.currentText() == "base" and panel.model_combo.isEnabled()
    assert panel.memory_label.text() == (f"<b>base</b>, 86 M parameters: needs about {base} of memory; 16 GB free "
                                        "on this computer.")
    manager = ModelManagerDialog(None)
    shown = {manager.table.item(row, 0).text(): manager.table.item(row, MEMORY_COLUMN).text()
             for row in range(manager.table.rowCount())}
    assert shown["base"] == f"~{base}"

    panel.model_override.setText(str(tiny_model_dir))

    assert not panel.model_combo.isEnabled()
    assert re.fullmatch(rf"Runs <b>{tiny_model_dir.name}</b> \(model override\), 0\.\d M parameters: needs about "
                        r"0\.\d GB of memory; 16 GB free on this computer\.", panel.memory_label.text())
    assert panel.model_in_use() == str(tiny_model_dir)
    panel.model_override.setText("someone/dinov3-finetuned")
    assert panel.memory_label.text() == ("Runs <b>someone/dinov3-finetuned</b> (model override): memory needed "
                                        "unknown until it loads.")


def test_a_new_run_takes_the_earlier_runs_messages_off_the_bar(qgis_app):
    from qgis.core import Qgis
    from qgis.gui import QgsMessageBar

    from treeseg_qgis.qgis_side.gui.task import MESSAGE_TITLE, clear_messages

    bar = QgsMessageBar()
    bar.pushMessage(MESSAGE_TITLE, "scene: the engine stopped unexpectedly", Qgis.MessageLevel.Critical, 0)
    bar.pushMessage(MESSAGE_TITLE, "scene: K=4, tree cover 56.2 %", Qgis.MessageLevel.Success, 0)
    bar.pushMessage("Other plugin", "still here", Qgis.MessageLevel.Info, 0)

    clear_messages(bar)

    assert [item.title() for item in bar.items()] == ["Other plugin"]
