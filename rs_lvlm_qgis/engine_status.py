"""The dock's engine line: which device and model answer, or what to do when none can.

Kept apart from the dock: it is the only part that asks the engine ``info``, and the only
place that decides when the "Set up the engine…" button shows (no interpreter found).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from qgis.core import Qgis
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtWidgets import QLabel, QPushButton, QWidget

from . import settings
from .engine_client import ENGINE_MISSING, EngineClient, EngineRequest
from .messages import SETUP_BUTTON, describe_engine, failure_text


class EngineStatus(QObject):
    """Owns ``deviceLabel`` and ``setupEngineButton``; reports sentences via ``message``."""

    info = pyqtSignal(object)  # the info result dict
    message = pyqtSignal(str, int)  # text, Qgis level

    def __init__(self, client: EngineClient, parent: QWidget) -> None:
        super().__init__(parent)
        self.client = client
        self.deviceLabel = QLabel("Engine: not started", parent)
        self.deviceLabel.setObjectName("deviceLabel")
        self.deviceLabel.setWordWrap(True)
        self.setupEngineButton = QPushButton(SETUP_BUTTON, parent)
        self.setupEngineButton.setObjectName("setupEngineButton")
        self.setupEngineButton.setVisible(False)

    def refresh(self) -> EngineRequest:
        """Ask the engine which device and model it uses (starting it if needed)."""
        values = settings.load()
        params: Dict[str, Any] = {}
        if values.model_dir:
            params["model"] = values.model_dir
        if values.device != "auto":
            params["device"] = values.device
        req = self.client.request("info", params, timeout_s=180)
        self.deviceLabel.setText("Engine: starting…")
        req.succeeded.connect(self._on_info)
        req.failed.connect(self.on_failure)
        return req

    def _on_info(self, info: Dict[str, Any]) -> None:
        self.deviceLabel.setText(describe_engine(info))
        self.setupEngineButton.setVisible(False)
        self.info.emit(info)

    def on_failure(self, code: str, message: str, report: bool = True) -> None:
        """Show what a failed request says about the engine (also used for failed asks)."""
        if code == ENGINE_MISSING:
            self.setupEngineButton.setVisible(True)
            self.deviceLabel.setText("Engine: not set up")
            text: Optional[str] = failure_text(code, message)
        else:
            self.deviceLabel.setText(f"Engine: unavailable ({code})")
            text = f"The engine is not working: {message}"
        if report:
            self.message.emit(text, int(Qgis.Warning))
