"""A QgsTask that runs child processes and stops them when cancelled.

Why: QgsTask.cancel() only sets a flag the worker thread polls; a pip or build-knowledge child
would run on for minutes.  Terminating the running child makes "Cancel" in the task manager
take effect at once, for every background job of the plugin.
"""
from __future__ import annotations

import subprocess
from typing import Optional

from qgis.core import QgsTask


class SubprocessTask(QgsTask):
    """Base of the plugin's tasks that run one child process at a time in ``_proc``."""

    def __init__(self, description: str) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self._proc: Optional[subprocess.Popen] = None

    def cancel(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        super().cancel()
