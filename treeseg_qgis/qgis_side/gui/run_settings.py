"""The run panel's settings kept between sessions in QgsSettings: every parameter that declares itself remembered
(`params.remembered_names`), each read from and shown in its widget, and the panel's own choices."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsSettings
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from ...params import remembered_names
from .run_params import DEFAULTS

SETTINGS_PREFIX = "treeseg/dock/"


def _value_of(widget: QWidget) -> Any:
    """What a settings widget shows: a combo box's item data, a check, a number, a text or a path."""
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        return widget.value()
    if isinstance(widget, QLineEdit):
        return widget.text().strip()
    return widget.filePath()


def _show_value(widget: QWidget, value: Any) -> None:
    """Put `value` in a settings widget; a combo box keeps its choice when no item has that data."""
    if isinstance(widget, QComboBox):
        index = widget.findData(value)
        if index >= 0:
            widget.setCurrentIndex(index)
    elif isinstance(widget, QCheckBox):
        widget.setChecked(value)
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QLineEdit):
        widget.setText(value)
    else:
        widget.setFilePath(value)


class RememberedSettings:
    """The widgets whose values are kept under SETTINGS_PREFIX, each with the value it shows before any run.

    `parameters` maps each remembered parameter to its widget (a missing one is a KeyError), `shown_defaults`
    what a widget shows for a parameter whose default it cannot show (by default the parameter's own), and
    `choices` the panel's own settings: key → (widget, value before any run).
    """

    def __init__(self, parameters: dict[str, QWidget], shown_defaults: dict[str, Any],
                 choices: dict[str, tuple[QWidget, Any]]) -> None:
        self._kept = {
            **{name: (parameters[name], shown_defaults.get(name, getattr(DEFAULTS, name)))
               for name in remembered_names()},
            **choices,
        }

    def restore(self) -> None:
        """Show the last run's settings (the values before any run when there was none)."""
        settings = QgsSettings()
        for key, (widget, default) in self._kept.items():
            _show_value(widget, settings.value(SETTINGS_PREFIX + key, default, type=type(default)))

    def save(self) -> None:
        """Keep what the widgets show for the next session."""
        settings = QgsSettings()
        for key, (widget, _) in self._kept.items():
            settings.setValue(SETTINGS_PREFIX + key, _value_of(widget))
