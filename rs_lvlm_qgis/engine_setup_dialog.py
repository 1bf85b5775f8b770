"""The engine set-up dialog: where the venv goes, online or from a folder of wheels, the log.

The analyst reads one line when the set-up fails ("no network: ..."), with the full pip log
below it for whoever helps them; the choice of a local wheel folder is remembered, so a machine
without network is set up the same way every time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .engine_setup_task import EngineSetupTask, SetupParameters, has_cuda, requirements_file


class EngineSetupDialog(QDialog):
    """Shows the pip log of an :class:`EngineSetupTask` while it runs in the task manager."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("RsLvlmEngineSetupDialog")
        self.setWindowTitle("RS-LVLM: engine set-up")
        self.resize(720, 460)
        self.task: Optional[EngineSetupTask] = None
        cuda = has_cuda()
        self.requirements = requirements_file(cuda)
        self.venv = settings.user_venv_dir()
        self.info = QLabel(
            f"A Python environment for the engine will be created in\n{self.venv}\n"
            f"with the {'CUDA' if cuda else 'CPU'} requirements of\n{self.requirements}\n"
            "(every package pinned and hash-checked). Online this downloads several hundred MB "
            "and takes a few minutes; nothing changes until the new environment works.")
        self.info.setWordWrap(True)
        self.offline_check = QCheckBox("Install from a folder of wheels (no network needed)")
        self.offline_check.setObjectName("offlineCheck")
        self.wheel_edit = QgsFileWidget()
        self.wheel_edit.setObjectName("wheelDirEdit")
        self.wheel_edit.setStorageMode(QgsFileWidget.GetDirectory)
        self.wheel_edit.setToolTip("A folder made by scripts/download_wheels.sh (make wheels) "
                                   "on a machine with network access")
        saved = settings.wheel_dir()
        self.wheel_edit.setFilePath(saved)
        self.offline_check.setChecked(bool(saved))
        self.wheel_edit.setEnabled(bool(saved))
        self.offline_check.toggled.connect(self.wheel_edit.setEnabled)
        self.summary = QLabel("")
        self.summary.setObjectName("setupSummary")
        self.summary.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setObjectName("setupLog")
        self.log.setReadOnly(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.start_button = QPushButton("Create environment")
        self.start_button.setObjectName("setupStartButton")
        self.start_button.setEnabled(self.requirements is not None)
        self.start_button.clicked.connect(self.start)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        for widget in (self.info, self.offline_check, self.wheel_edit, self.summary, self.log,
                       self.progress, self.start_button, buttons):
            layout.addWidget(widget)

    def parameters(self) -> Optional[SetupParameters]:
        """The task's parameters from the dialog (``None`` when nothing can be installed)."""
        if self.requirements is None:
            return None
        wheels = self.wheel_edit.filePath().strip() if self.offline_check.isChecked() else ""
        return SetupParameters(self.venv, self.requirements,
                               wheel_dir=Path(wheels) if wheels else None)

    def start(self, params: Optional[SetupParameters] = None) -> Optional[EngineSetupTask]:
        """Queue the set-up task (from the dialog's choices unless ``params`` is given); the
        dialog may be closed, the task keeps running."""
        params = params or self.parameters()
        if params is None:
            return None
        settings.set_wheel_dir(str(params.wheel_dir or ""))
        self.task = EngineSetupTask(params)
        self.task.logLine.connect(self.log.appendPlainText)
        self.task.progressChanged.connect(self._on_progress)
        self.task.taskCompleted.connect(lambda: self._done(True))
        self.task.taskTerminated.connect(lambda: self._done(False))
        self.start_button.setEnabled(False)
        self.summary.setText("Setting up the engine…")
        self.summary.setStyleSheet("")
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def _on_progress(self, value: float) -> None:
        self.progress.setTextVisible(True)
        self.progress.setValue(int(value))

    def _done(self, ok: bool) -> None:
        task = self.task
        if ok:
            self.summary.setText("Done. The engine will start on the next question.")
            self.log.appendPlainText("Done. The engine will start on the next question.")
            self.progress.setValue(100)
        else:
            line = "Set-up failed: " + ((task.error if task else "") or "unknown error")
            self.summary.setText(line)
            self.summary.setStyleSheet("color: #c00000;")
            self.log.appendPlainText(line)
            self.progress.setValue(0)
            self.progress.setTextVisible(False)
            self.start_button.setEnabled(True)
