"""A blocking engine session for Processing: ``python -m engine serve`` driven from a worker thread.

Why not :class:`rs_lvlm_qgis.engine_client.EngineClient`: that client lives on the Qt event loop
of QGIS's main thread (QProcess signals), while a Processing algorithm runs in a task thread, in
batch mode, in the Graphical Modeler or in ``qgis_process``, with no event loop to deliver them.
So here the engine is a plain subprocess started the same way (the same interpreter lookup, the
same cleaned environment from :func:`engine_client.child_environment`, the same protocol), with a
reader thread for its replies; the algorithm polls them and the feedback's cancel flag.

Cancel: a ``cancel`` request first (a scan stops after its current batch, keeping what it wrote),
then, if the engine has not answered within a grace period, the process is killed.
"""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Optional

from qgis.core import QgsProcessingException, QgsProcessingFeedback
from qgis.PyQt.QtCore import QProcessEnvironment

from .. import paths, settings
from ..engine_client import child_environment

__all__ = ["EngineSession", "engine_defaults"]

CANCEL_GRACE_S = 20.0
ProgressFn = Callable[[int, int, str], None]


def engine_defaults() -> Dict[str, Any]:
    """The user's model, device, precision and answer length from the plugin settings."""
    values = settings.load()
    out: Dict[str, Any] = {"device": values.device, "precision": values.precision}
    if values.model_dir:
        out["model"] = values.model_dir
    return out


def _environment() -> Dict[str, str]:
    root = paths.engine_root()
    env = child_environment(QProcessEnvironment.systemEnvironment(), root)
    return {key: env.value(key) for key in env.keys()}


class EngineSession:
    """One engine process for the length of an algorithm run (``with EngineSession(feedback) as s``)."""

    def __init__(self, feedback: Optional[QgsProcessingFeedback]) -> None:
        self.feedback = feedback or QgsProcessingFeedback()
        python = settings.resolve_engine_python()
        root = paths.engine_root()
        if not python:
            raise QgsProcessingException(
                "The RS-LVLM engine is not set up: set its interpreter in the plugin settings or in "
                "RS_LVLM_ENGINE_PYTHON, or create the engine environment from the settings dialog.")
        if root is None:
            raise QgsProcessingException("The engine package was not found next to the plugin; reinstall it.")
        self._proc = subprocess.Popen([python, "-m", "engine", "serve", *settings.engine_serve_arguments()],
                                      cwd=str(root), env=_environment(),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._replies: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._stderr: list = []
        self._next_id = 1
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> "EngineSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            try:
                message = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(message, dict):
                self._replies.put(message)
        self._replies.put(None)  # the engine is gone

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr = (self._stderr + [line])[-20:]

    def _send(self, method: str, params: Dict[str, Any]) -> int:
        request_id = self._next_id
        self._next_id += 1
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps({"id": request_id, "method": method, "params": params}) + "\n").encode())
            self._proc.stdin.flush()
        except OSError:
            raise QgsProcessingException(self._died("before it took the request")) from None
        return request_id

    def _died(self, when: str) -> str:
        tail = "\n".join(self._stderr[-8:])
        return f"The RS-LVLM engine exited {when}." + (f"\n{tail}" if tail else "")

    def call(self, method: str, params: Dict[str, Any], on_progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
        """Send one request and block until its result; raises QgsProcessingException on error/cancel."""
        request_id = self._send(method, params)
        cancel_sent_at: Optional[float] = None
        while True:
            if self.feedback.isCanceled() and cancel_sent_at is None:
                self._send("cancel", {"target": request_id})
                cancel_sent_at = time.monotonic()
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > CANCEL_GRACE_S:
                self.kill()
                raise QgsProcessingException("Cancelled (the engine was stopped).")
            try:
                message = self._replies.get(timeout=0.1)
            except queue.Empty:
                continue
            if message is None:
                raise QgsProcessingException(self._died("during the request"))
            if message.get("id") != request_id:
                continue
            kind = message.get("type")
            if kind == "progress" and on_progress is not None:
                on_progress(int(message.get("done") or 0), int(message.get("total") or 0), str(message.get("message") or ""))
            elif kind == "result":
                result = message.get("result")
                return result if isinstance(result, dict) else {"value": result}
            elif kind == "error":
                err = message.get("error") or {}
                code, text = str(err.get("code") or "error"), str(err.get("message") or "")
                if code == "cancelled":
                    raise QgsProcessingException("Cancelled; what was done so far is kept.")
                raise QgsProcessingException(f"{text} ({code})")

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def close(self) -> None:
        """Shut the engine down politely, killing it if it lingers; then release its pipes."""
        if self._proc.poll() is None:
            try:
                self._send("shutdown", {})
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, QgsProcessingException, subprocess.TimeoutExpired):
                self.kill()
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
