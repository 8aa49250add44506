"""Box layouts filled in one call: `hbox(a, (b, 1), c)` instead of one `addWidget` line per widget; labels that
wrap (and may be selected), buttons, check boxes, line edits and combo boxes with their tooltip (and a button's
action) and form layouts of their rows in one call too; a status line shown in red for an error. Qt alone (no
qgis.gui), so the real-Qt6 check (tests/test_qt6_real.py) builds them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QBoxLayout,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

ERROR_STYLE = "color: #b00020;"

LayoutItem = Union[QWidget, QLayout, tuple[Union[QWidget, QLayout], int], int]
FormRow = Union[QWidget, tuple[Union[str, QWidget], Union[QWidget, QLayout]]]
"""A form row: a widget across the whole row, or (label text or widget, field widget or layout)."""


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


def line_edit(text: str = "", placeholder: str = "", tooltip: str = "") -> QLineEdit:
    """A line edit holding `text`, with its placeholder and tooltip."""
    widget = QLineEdit(text)
    widget.setPlaceholderText(placeholder)
    widget.setToolTip(tooltip)
    return widget


def choice_combo(choices: Iterable[tuple[str, Any]], tooltip: str = "") -> QComboBox:
    """A combo box of (text, item data) choices, with its tooltip."""
    combo = QComboBox()
    for text, data in choices:
        combo.addItem(text, data)
    combo.setToolTip(tooltip)
    return combo


def fill_form(form: QFormLayout, *rows: FormRow) -> QFormLayout:
    """Add `rows` to `form` in order (see FormRow). Returns `form`."""
    for row in rows:
        if isinstance(row, tuple):
            form.addRow(*row)
        else:
            form.addRow(row)
    return form


def form_layout(*rows: FormRow) -> QFormLayout:
    """A form of `rows` whose fields take the width there is and whose long rows wrap under their label."""
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    return fill_form(form, *rows)


def show_status(label: QLabel, text: str, error: bool = False) -> None:
    """`text` in `label`, in red for an error."""
    label.setText(text)
    label.setStyleSheet(ERROR_STYLE if error else "")
