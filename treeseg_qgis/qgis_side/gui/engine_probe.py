"""The run panel's engine: whether there is one, and what its probe found (the device a run would use, its free
memory, the precision `auto` means there). The probe starts the engine in a ProbeTask, once per engine."""

from __future__ import annotations

import html
from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtWidgets import QLabel, QPushButton

from ..engine_client import EngineClient, missing_engine_message
from .layouts import show_status
from .task import ProbeTask


class EngineProbe(QObject):
    """`engine` (None when the engine environment is missing) and its probe, told in `label`; `setup_button` shows
    while there is no engine or the probe found it unusable. `probed(ok)` follows the probe's answer."""

    probed = pyqtSignal(bool)

    def __init__(self, engine: EngineClient | None, label: QLabel, setup_button: QPushButton) -> None:
        super().__init__()
        self.label = label
        self.setup_button = setup_button
        self.engine = engine
        self.info: dict[str, Any] | None = None
        """The probe's answer; None before it, or when it failed."""
        self.usable = True
        """False once the probe found the engine unusable, until another engine is set."""
        self._task: ProbeTask | None = None
        self._started = False
        self._show_presence()

    @property
    def waiting(self) -> bool:
        """The probe is under way: the engine is still starting."""
        return self._task is not None

    def found(self, key: str, default: Any) -> Any:
        """`key` of the probe's answer; `default` before it, or when it failed."""
        return (self.info or {}).get(key, default)

    def start(self) -> None:
        """Start the engine and ask it for its device, unless there is no engine or this one was already asked."""
        if self.engine is None or self._started:
            return
        self._started = True
        self.label.setText("Engine: starting…")
        self._task = ProbeTask(self.engine)
        self._task.probed.connect(self._show)
        QgsApplication.taskManager().addTask(self._task)

    def stop(self) -> None:
        """Forget the probe under way: its answer is not shown."""
        if self._task is not None:
            self._task.probed.disconnect(self._show)
            self._task = None

    def set_engine(self, engine: EngineClient | None, start: bool) -> None:
        """Use `engine` from now on; probe it at once when `start`, else on the next `start()`."""
        self.stop()
        self.engine = engine
        self._started = False
        self.usable = True
        self._show_presence()
        if start:
            self.start()

    def _show(self, description: str, ok: bool) -> None:
        self.info = self._task.record if self._task is not None and ok else None
        self._task = None
        self.usable = ok
        if ok:
            show_status(self.label, f"Engine: {description}")
        else:
            error = html.escape(description).replace("\n", "<br>")
            show_status(self.label, f"<b>Engine not usable.</b> {error}", error=True)
        self.setup_button.setVisible(not ok)
        self.probed.emit(ok)

    def _show_presence(self) -> None:
        """The label before the probe; the set-up button while there is no engine."""
        if self.engine is None:
            show_status(self.label, f"<b>Engine missing.</b> {missing_engine_message()}", error=True)
        else:
            show_status(self.label, "Engine: starts when the panel opens…")
        self.setup_button.setVisible(self.engine is None)
