"""The TreeSeg dock: the run panel above the teach panel, in one scroll area.

gui/run_panel.py chooses the raster and the settings, runs and shows the result; gui/teach_panel.py then
teaches by clicking on the input of that run. The dock only holds them and wires them together: the
engine goes to both, one runs while the other waits, a finished run goes to the teach panel and a
teach run's progress shows on the run panel's bar.
"""

from __future__ import annotations

from qgis.gui import QgisInterface, QgsDockWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QScrollArea, QWidget

from ..engine_client import EngineClient
from .layouts import vbox
from .run_panel import RunPanel
from .teach_panel import TeachPanel


class TreesegDock(QgsDockWidget):
    """The TreeSeg panel; `engine` is None when the engine environment is missing (Run is then disabled and
    `engine_setup_requested` asks for the set-up dialog). `models_requested` asks for Models…"""

    engine_setup_requested = pyqtSignal()
    models_requested = pyqtSignal()

    def __init__(self, iface: QgisInterface, engine: EngineClient | None, parent: QWidget | None = None) -> None:
        super().__init__("TreeSeg (DINOv3)", parent)
        self.setObjectName("TreesegDock")
        self.run_panel = RunPanel(iface, engine)
        self.teach_panel = TeachPanel(iface, engine)
        content = QWidget()
        content.setLayout(vbox(self.run_panel, self.teach_panel, 1))
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        self.setWidget(scroll)
        self.run_panel.setup_button.clicked.connect(self.engine_setup_requested)
        self.run_panel.models_button.clicked.connect(self.models_requested)
        self.run_panel.running_changed.connect(self.teach_panel.set_running)
        self.run_panel.run_succeeded.connect(self.teach_panel.prepare)
        self.teach_panel.teaching_changed.connect(self.run_panel.set_teaching)
        self.teach_panel.progress_changed.connect(self.run_panel.show_progress)

    def set_engine(self, engine: EngineClient | None) -> None:
        """Use `engine` from now on in both panels (the set-up dialog made or removed one)."""
        self.run_panel.set_engine(engine)
        self.teach_panel.set_engine(engine)

    def shutdown(self) -> None:
        """Cancel what runs and remove the teach tool and the scratch input (the plugin is unloading)."""
        self.run_panel.shutdown()
        self.teach_panel.shutdown()
