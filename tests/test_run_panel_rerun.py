"""A second run from the panel: the elbow plot of the first stays until the second's result, so Cancel does not
move under the pointer when Run is clicked."""

from __future__ import annotations

from .test_gui import add_raster, clean_settings, plugin, set_up_run, wait_until  # noqa: F401 - fixtures


def settle(panel) -> None:
    """Lay the dock out as the screen shows it after a change (layout requests are posted events, handled from the
    innermost widget out)."""
    from qgis.core import QgsApplication

    widget = panel
    while widget is not None:
        QgsApplication.processEvents()
        if widget.layout() is not None:
            widget.layout().activate()
        widget = widget.parentWidget()
    QgsApplication.processEvents()


def test_cancel_stays_in_place_when_a_second_run_starts(
        plugin, qgis_iface, scene_tif, tiny_model_dir, tmp_path):  # noqa: F811 - plugin: the fixture
    from qgis.PyQt.QtCore import QPoint

    path, _ = scene_tif
    panel = plugin.dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, tiny_model_dir, tmp_path / "out", clusters=None)
    plugin.action.trigger()
    panel.run_button.click()
    wait_until(lambda: panel.task is None)
    settle(panel)
    assert panel.elbow_image.isVisible() and panel.elbow_caption.text().startswith("Automatic K = ")

    def cancel_position() -> QPoint:
        return panel.cancel_button.mapTo(panel.window(), QPoint(0, 0))

    before = cancel_position()
    panel.run_button.click()
    settle(panel)

    assert panel.task is not None and cancel_position() == before
    assert panel.elbow_caption.text().startswith("Last run: Automatic K = ")
    wait_until(lambda: panel.task is None)
    assert panel.elbow_caption.text().startswith("Automatic K = ")
