"""The plugin object QGIS manages: a toolbar button and menu entry that open the dock.

The dock and the engine client are created lazily on first use, so enabling the plugin costs
nothing at QGIS start-up and no engine process exists until the analyst opens the panel.  On
unload the engine is shut down and every widget, action and map tool is removed, so "reload
plugin" leaves no leftovers.
"""
from __future__ import annotations

from typing import Any, Optional

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from . import paths, settings
from .dock_widget import RsLvlmDock
from .engine_client import EngineClient

MENU = "RS-LVLM"


def _call(iface: Any, name: str, *args: Any) -> None:
    """Call an iface method if this interface has it (test stubs implement only a subset)."""
    method = getattr(iface, name, None)
    if method is not None:
        method(*args)


class RsLvlmPlugin:
    """Entry point returned by :func:`rs_lvlm_qgis.classFactory`."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.action: Optional[QAction] = None
        self.settings_action: Optional[QAction] = None
        self.dock: Optional[RsLvlmDock] = None
        self.client: Optional[EngineClient] = None
        self.provider: Optional[Any] = None  # the Processing provider (rs_lvlm)

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API; qgis_process calls only this)
        from . import processing  # pylint: disable=import-outside-toplevel

        self.provider = processing.register()

    def initGui(self) -> None:  # noqa: N802 (QGIS API)
        self.initProcessing()
        icon = QIcon(paths.icon_path())
        self.action = QAction(icon, "RS-LVLM", self.iface.mainWindow())
        self.action.setObjectName("RsLvlmAction")
        self.action.setToolTip("RS-LVLM: ask the remote-sensing model about a map region")
        self.action.setCheckable(True)
        self.action.triggered.connect(self.toggle_dock)
        self.settings_action = QAction("RS-LVLM settings…", self.iface.mainWindow())
        self.settings_action.setObjectName("RsLvlmSettingsAction")
        self.settings_action.triggered.connect(self.open_settings)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)
        self.iface.addPluginToMenu(MENU, self.settings_action)

    def unload(self) -> None:
        if self.provider is not None:
            from . import processing  # pylint: disable=import-outside-toplevel

            processing.unregister(self.provider)
            self.provider = None
        if self.dock is not None:
            self.dock.shutdown()
            _call(self.iface, "removeDockWidget", self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.client is not None:
            self.client.stop()
            self.client.deleteLater()
            self.client = None
        for action in (self.action, self.settings_action):
            if action is not None:
                _call(self.iface, "removePluginMenu", MENU, action)
                _call(self.iface, "removeToolBarIcon", action)
                action.deleteLater()
        self.action = self.settings_action = None

    def engine_client(self) -> EngineClient:
        """The shared engine client (created on first use; the process starts on first request)."""
        if self.client is None:
            self.client = EngineClient(settings.resolve_engine_python,
                                       serve_arguments=settings.engine_serve_arguments)
        return self.client

    def show_dock(self) -> RsLvlmDock:
        """Create (once) and show the dock; returns it so scripts and tests can drive it."""
        if self.dock is None:
            self.dock = RsLvlmDock(self.iface, self.engine_client(), self.iface.mainWindow())
            self.dock.visibilityChanged.connect(self._sync_action)
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.show()
        self.dock.raise_()
        self.dock.refresh_engine_info()
        return self.dock

    def toggle_dock(self, checked: bool = True) -> None:
        if checked or self.dock is None or not self.dock.isVisible():
            self.show_dock()
        else:
            self.dock.hide()

    def _sync_action(self, visible: bool) -> None:
        if self.action is not None:
            self.action.setChecked(visible)

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog  # pylint: disable=import-outside-toplevel

        if SettingsDialog(self.iface.mainWindow()).exec_() and self.dock is not None:
            self.dock.refresh_engine_info()
