"""Box layouts filled in one call: `hbox(a, (b, 1), c)` instead of one `addWidget` line per widget; labels that
wrap (and may be selected), and buttons and check boxes with their tooltip (and a button's action), in one call
too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QBoxLayout,
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

LayoutItem = Union[QWidget, QLayout, tuple[Union[QWidget, QLayout], int], int]


def fill(layout: QBoxLayout, *items: LayoutItem) -> QBoxLayout:
    """Add widgets and layouts to `layout` in order: `(item, stretch)` gives the item a stretch factor and a
    bare number adds an empty stretch of that factor. Returns `layout`."""
    for item in items:
        if isinstance(item, int):
            layout.addStretch(item)
            continue
        part, stretch = item if isinstance(item, tuple) else (item, 0)
        if isinstance(part, QLayout):
            layout.addLayout(part, stretch)
        else:
            layout.addWidget(part, stretch)
    return layout


def hbox(*items: LayoutItem) -> QHBoxLayout:
    """A horizontal layout of `items` (see `fill`)."""
    return fill(QHBoxLayout(), *items)


def vbox(*items: LayoutItem) -> QVBoxLayout:
    """A vertical layout of `items` (see `fill`)."""
    return fill(QVBoxLayout(), *items)


def wrapped_label(text: str = "", selectable: bool = False) -> QLabel:
    """A label whose text wraps; `selectable`: the text can be selected with the mouse (a path, an error)."""
    label = QLabel(text)
    label.setWordWrap(True)
    if selectable:
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def button(text: str, tooltip: str = "", clicked: Callable[[], object] | None = None) -> QPushButton:
    """A push button with its tooltip; `clicked` is called when it is clicked."""
    widget = QPushButton(text)
    widget.setToolTip(tooltip)
    if clicked is not None:
        widget.clicked.connect(clicked)
    return widget


def check_box(text: str, tooltip: str = "") -> QCheckBox:
    """A check box with its tooltip."""
    widget = QCheckBox(text)
    widget.setToolTip(tooltip)
    return widget
