"""The QGIS plugin: the Processing provider, a toolbar button and Raster menu entries, and the TreeSeg panel.

Loads without the engine environment: the panel then says what is missing and
offers the engine set-up dialog (also in the menu); Run stays disabled until an
engine is set up, which takes effect without a restart. The panel and Processing share one
EngineClient per engine (engine_client.shared_engine), so one worker process keeps the model loaded
between their runs; unload stops it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qgis.core import QgsApplication
from qgis.gui import QgisInterface
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon

from .compat import QAction
from .engine_client import EngineClient, close_shared_engines, configured_engine_python, shared_engine
from .gui.dock import TreesegDock
from .gui.engine_setup import EngineSetupDialog
from .gui.model_manager import ModelManagerDialog
from .processing.provider import icon_path

MENU = "TreeSeg (DINOv3)"


def configured_engine() -> EngineClient | None:
    """The session's shared EngineClient for the configured engine, or None."""
    python = configured_engine_python()
    return shared_engine(python) if python else None


def _dispose(dialog: EngineSetupDialog | ModelManagerDialog | None) -> None:
    """Stop what `dialog` runs and delete it (nothing when None)."""
    if dialog is not None:
        dialog.shutdown()
        dialog.deleteLater()


class TreesegPlugin:
    """Created by classFactory; QGIS calls initProcessing (qgis_process), or initGui, and unload."""

    def __init__(self, iface: QgisInterface) -> None:
        self.iface = iface
        self.provider = None
        self.engine: EngineClient | None = None
        self.dock: TreesegDock | None = None
        self.action: QAction | None = None
        self.setup_action: QAction | None = None
        self.setup_dialog: EngineSetupDialog | None = None
        self.models_action: QAction | None = None
        self.model_manager: ModelManagerDialog | None = None

    def initProcessing(self) -> None:  # noqa: N802 - the name QGIS calls
        """Register the Processing provider (no GUI: qgis_process calls only this)."""
        from .processing.provider import TreesegProvider

        if self.provider is None:
            self.provider = TreesegProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - the name QGIS calls
        """Add the provider, the panel (hidden until asked for), the toolbar button and the menu entries."""
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
        self.setup_action = self._add_menu_action(
            "Set up the engine…",
            "Install TreeSeg's engine (torch, transformers) in a Python environment of its own, or choose one",
            self.show_engine_setup)
        self.dock.engine_setup_requested.connect(self.show_engine_setup)
        self.dock.models_requested.connect(self.show_model_manager)
        self.models_action = self._add_menu_action(
            "Models…", "DINOv3 models on this computer: download, delete, Hugging Face token, a local model folder",
            self.show_model_manager)

    def _add_menu_action(self, text: str, tooltip: str, slot: Callable[[], None]) -> QAction:
        """An action in the plugin's raster menu that calls `slot`."""
        action = QAction(text, self.iface.mainWindow())
        action.setToolTip(tooltip)
        action.triggered.connect(slot)
        self.iface.addPluginToRasterMenu(MENU, action)
        return action

    def _remove_menu_action(self, action: QAction | None) -> None:
        """Take an action made by `_add_menu_action` out of the menu (nothing when it is None)."""
        if action is not None:
            self.iface.removePluginRasterMenu(MENU, action)
            action.deleteLater()

    def show_engine_setup(self) -> None:
        """Open the engine set-up dialog (made once, kept while the plugin is loaded)."""
        if self.setup_dialog is None:
            self.setup_dialog = EngineSetupDialog(parent=self.iface.mainWindow())
            self.setup_dialog.engine_ready.connect(self._engine_ready)
            self.setup_dialog.engine_removed.connect(self._engine_removed)
            self.setup_dialog.stop_engine_requested.connect(self._stop_private_engine)
        self.setup_dialog.show()
        self.setup_dialog.raise_()
        self.setup_dialog.activateWindow()

    def _engine_ready(self, python: str) -> None:
        self._use_engine(shared_engine(python))

    def _engine_removed(self) -> None:
        self._use_engine(configured_engine())

    def _use_engine(self, engine: EngineClient | None) -> None:
        """Switch to `engine` without a restart: the old worker stops, the panel probes the new one."""
        if self.engine is not None:
            self.engine.close()
        self.engine = engine
        if self.dock is not None:
            self.dock.set_engine(engine)

    def _stop_private_engine(self) -> None:
        """Stop the worker when it runs from the environment the set-up dialog is about to change."""
        if (self.engine is not None and self.setup_dialog is not None
                and Path(self.engine.python).is_relative_to(self.setup_dialog.engines_root)):
            self.engine.close()

    def show_model_manager(self) -> None:
        """Open the model manager; a closed, idle one is made anew so that it uses the current engine."""
        dialog = self.model_manager
        if dialog is None or (dialog.task is None and not dialog.isVisible()):
            _dispose(dialog)
            python = configured_engine_python()
            dialog = self.model_manager = ModelManagerDialog(EngineClient(python) if python else None,
                                                             self.iface.mainWindow())
            dialog.local_folder_chosen.connect(self._use_local_model)
            dialog.refresh()
        dialog.show_model_in_use(self.dock.run_panel.model_override.text().strip() if self.dock is not None else "")
        dialog.show()
        dialog.raise_()
        dialog.activateWindow()

    def _use_local_model(self, folder: str) -> None:
        if self.dock is not None:
            self.dock.run_panel.model_override.setText(folder)
            self.dock.show()
        if self.model_manager is not None:
            self.model_manager.show_model_in_use(folder)

    def unload(self) -> None:
        """Remove everything initGui and initProcessing added and stop the engine worker."""
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        self._remove_menu_action(self.setup_action)
        _dispose(self.setup_dialog)
        self._remove_menu_action(self.models_action)
        _dispose(self.model_manager)
        self.setup_action = self.setup_dialog = self.models_action = self.model_manager = None
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        close_shared_engines()
        self.engine = None
