"""The QGIS plugin: the Processing provider, a toolbar button and Raster menu entry, and the TreeSeg panel.

Loads without the engine environment: the panel then says what is missing and
Run stays disabled. One EngineClient is shared by the panel's runs, so the
worker process keeps the model loaded between them.
"""

from __future__ import annotations

from qgis.core import QgsApplication, QgsSettings
from qgis.gui import QgisInterface
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .engine_client import EngineClient, find_engine_python
from .gui.dock import TreesegDock
from .processing.engine_algorithm import ENGINE_PYTHON_SETTING
from .processing.provider import icon_path

MENU = "TreeSeg (DINOv3)"


def configured_engine() -> EngineClient | None:
    """An EngineClient for the engine's Python (setting, environment, deploy record or .venv), or None."""
    python = find_engine_python(QgsSettings().value(ENGINE_PYTHON_SETTING, "", type=str) or None)
    return EngineClient(python) if python else None


class TreesegPlugin:
    """Created by classFactory; QGIS calls initProcessing (qgis_process), or initGui, and unload."""

    def __init__(self, iface: QgisInterface) -> None:
        self.iface = iface
        self.provider = None
        self.engine: EngineClient | None = None
        self.dock: TreesegDock | None = None
        self.action: QAction | None = None

    def initProcessing(self) -> None:  # noqa: N802 - the name QGIS calls
        """Register the Processing provider (no GUI: qgis_process calls only this)."""
        from .processing.provider import TreesegProvider

        if self.provider is None:
            self.provider = TreesegProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - the name QGIS calls
        """Add the provider, the panel (hidden until asked for), the toolbar button and the menu entry."""
        self.initProcessing()
        self.engine = configured_engine()
        main_window = self.iface.mainWindow()
        self.dock = TreesegDock(self.iface, self.engine, main_window)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self.action = QAction(QIcon(str(icon_path())), "Segment Trees Panel", main_window)
        self.action.setToolTip("TreeSeg (DINOv3): segment trees in an orthophoto")
        self.action.setCheckable(True)
        self.action.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)

    def unload(self) -> None:
        """Remove everything initGui and initProcessing added and stop the engine worker."""
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
