"""The settings dialog.

Kept apart from the dock so the dock stays about asking questions; everything an analyst sets
once (interpreter, model folder, device, precision, token budget) lives here, together with the
one button that opens :class:`engine_setup_dialog.EngineSetupDialog` to create the per-user
engine venv when none exists.
"""
from __future__ import annotations

import os
from typing import Optional

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .engine_setup_dialog import EngineSetupDialog


EMBEDDED_MODEL = "Embedded model (default)"


def model_label(path: str) -> str:
    """The combo text of an added model folder: its name, flagged when it is not ready."""
    name = os.path.basename(os.path.normpath(path)) or path
    problem = settings.model_folder_problem(path)
    return f"{name} ({problem})" if problem else name


class SettingsDialog(QDialog):
    """Edit :class:`settings.EngineSettings`; saved on OK."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("RsLvlmSettingsDialog")
        self.setWindowTitle("RS-LVLM settings")
        values = settings.load()
        form = QFormLayout()
        self.python_edit = QgsFileWidget()
        self.python_edit.setObjectName("enginePythonEdit")
        self.python_edit.setFilePath(values.engine_python)
        self.model_combo = QComboBox()
        self.model_combo.setObjectName("modelCombo")
        self.add_model_button = QPushButton("Add folder…")
        self.add_model_button.setObjectName("addModelButton")
        self.add_model_button.clicked.connect(lambda: self.add_model_folder())
        self.remove_model_button = QPushButton("Remove")
        self.remove_model_button.setObjectName("removeModelButton")
        self.remove_model_button.clicked.connect(self.remove_model_folder)
        self.model_combo.currentIndexChanged.connect(self._on_model_choice)
        if values.model_dir:  # a folder set before the list existed (or by an administrator)
            settings.add_model_folder(values.model_dir)
        self._fill_models(values.model_dir)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.add_model_button)
        model_row.addWidget(self.remove_model_button)
        self.device_combo = QComboBox()
        self.device_combo.setObjectName("deviceCombo")
        self.device_combo.addItems(list(settings.DEVICES))
        self.device_combo.setCurrentText(values.device)
        self.precision_combo = QComboBox()
        self.precision_combo.setObjectName("precisionCombo")
        self.precision_combo.addItems(list(settings.PRECISIONS))
        self.precision_combo.setCurrentText(values.precision)
        self.tokens_spin = QSpinBox()
        self.tokens_spin.setObjectName("maxTokensSpin")
        self.tokens_spin.setRange(1, 4096)
        self.tokens_spin.setValue(values.max_tokens)
        self.timeout_spin = QSpinBox()
        self.timeout_spin.setObjectName("timeoutSpin")
        self.timeout_spin.setRange(5, 3600)
        self.timeout_spin.setSuffix(" s")
        self.timeout_spin.setValue(values.timeout_s)
        resolved = settings.resolve_engine_python(values)
        self.resolved_label = QLabel(resolved or "none found: set one or create the environment")
        self.resolved_label.setWordWrap(True)
        self.setup_button = QPushButton("Create engine environment…")
        self.setup_button.setObjectName("createEngineButton")
        self.setup_button.clicked.connect(self.open_setup)
        form.addRow("Engine Python (empty: automatic)", self.python_edit)
        form.addRow("Engine in use", self.resolved_label)
        form.addRow("", self.setup_button)
        form.addRow("Model", model_row)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow("Max tokens", self.tokens_spin)
        form.addRow("Inactivity timeout", self.timeout_spin)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)

    def values(self) -> settings.EngineSettings:
        return settings.EngineSettings(
            engine_python=self.python_edit.filePath().strip(),
            model_dir=self.model_dir(),
            device=self.device_combo.currentText(),
            precision=self.precision_combo.currentText(),
            max_tokens=self.tokens_spin.value(),
            timeout_s=self.timeout_spin.value(),
        )

    # ------------------------------------------------------------------ models
    def _fill_models(self, current: str) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItem(EMBEDDED_MODEL, "")
        self.model_combo.setItemData(0, "The model shipped with the plugin", Qt.ToolTipRole)
        for folder in settings.model_folders():
            self.model_combo.addItem(model_label(folder), folder)
            self.model_combo.setItemData(self.model_combo.count() - 1, folder, Qt.ToolTipRole)
        index = self.model_combo.findData(current)
        self.model_combo.setCurrentIndex(max(index, 0))
        self.model_combo.blockSignals(False)
        self._on_model_choice()

    def _on_model_choice(self, _index: int = 0) -> None:
        self.remove_model_button.setEnabled(self.model_combo.currentIndex() > 0)
        self.model_combo.setToolTip(self.model_dir() or "The model shipped with the plugin")

    def model_dir(self) -> str:
        """The chosen model folder ("" = the embedded model)."""
        return str(self.model_combo.currentData() or "")

    def add_model_folder(self, path: Optional[str] = None) -> Optional[str]:
        """Add a model folder (asks for one when none is given), remember it and select it."""
        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Model folder", self.model_dir())
        path = str(path or "").strip()
        if not path:
            return None
        settings.add_model_folder(path)
        self._fill_models(path)
        return path

    def remove_model_folder(self) -> None:
        """Forget the selected folder (the embedded model cannot be removed)."""
        if self.model_combo.currentIndex() <= 0:
            return
        settings.remove_model_folder(self.model_dir())
        self._fill_models("")

    def accept(self) -> None:
        settings.save(self.values())
        super().accept()

    def open_setup(self) -> None:
        EngineSetupDialog(self).exec_()
