"""The elbow plot of automatic K is readable where the panel shows it: its texts are as tall at the panel's width
as a small UI font's, not shrunk from a figure drawn for a page."""

from __future__ import annotations

import numpy as np

from .test_gui import add_raster, clean_settings, plugin, set_up_run, wait_until  # noqa: F401 - fixtures

SMALLEST_TEXT_PX = 8
"""The height of digits and lower-case ascenders of an 8.5 to 9 pt font on a 96 dpi screen (the elbow plot's texts
were 5 and 6 px tall at the panel's width before they were drawn for it)."""


def text_bands(image) -> list[int]:
    """The heights of the bands of rows with drawn pixels, top to bottom, of a QImage on a white background."""
    from qgis.PyQt.QtGui import QImage

    grey = image.convertToFormat(QImage.Format.Format_Grayscale8)
    bits = grey.constBits()
    bits.setsize(grey.bytesPerLine() * grey.height())
    pixels = np.frombuffer(bits, np.uint8).reshape(grey.height(), grey.bytesPerLine())[:, :grey.width()]
    drawn = (pixels < 200).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], drawn.astype(int), [0]])))
    return [int(end - start) for start, end in zip(edges[::2], edges[1::2])]


def test_the_elbow_plot_texts_are_readable_at_the_panel_width(
        plugin, qgis_iface, scene_tif, tiny_model_dir, tmp_path):  # noqa: F811 - plugin: the fixture
    from treeseg_qgis.qgis_side.gui.run_panel import ELBOW_WIDTH

    path, _ = scene_tif
    panel = plugin.dock.run_panel
    panel.layer_combo.setLayer(add_raster(path))
    set_up_run(panel, tiny_model_dir, tmp_path / "out", clusters=None)
    panel.run_button.click()
    wait_until(lambda: panel.task is None)

    shown = panel.elbow_image.pixmap()
    assert not shown.isNull()
    ratio = shown.devicePixelRatio()
    assert round(shown.width() / ratio) == ELBOW_WIDTH
    *_, tick_labels, axis_label = text_bands(shown.toImage())  # the x axis's numbers, then its label, at the bottom
    assert min(tick_labels, axis_label) / ratio >= SMALLEST_TEXT_PX, (tick_labels, axis_label)
