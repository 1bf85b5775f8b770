"""The plugin's side of the engine protocol: a long-lived ``python -m engine serve`` QProcess.

Why a QProcess and not a thread or an import: the engine loads torch/CUDA, which must never
share QGIS's interpreter (conflicting numpy/GDAL builds; an out-of-memory must not take QGIS
down).  QProcess delivers the engine's stdout through the Qt event loop, so nothing here ever
blocks the UI thread; replies are JSON lines matched to requests by id.

Behaviour the dock relies on:

* the engine is started on first use and kept alive, so the model stays loaded between
  questions;
* each request is an :class:`EngineRequest` with its own signals; a new ``ask`` supersedes the
  previous one, whose late replies are dropped (stale-answer protection) and which the engine
  is asked to cancel;
* an inactivity timeout per request (reset by every progress/token line);
* if the engine dies while requests are outstanding they fail with ``engine_died``, the engine
  is restarted and :attr:`EngineClient.restarted` tells the UI, so the question can be asked
  again; an engine that dies before ever answering is not restarted in a loop;
* the engine's health is checked: while requests are outstanding a ``ping`` is sent every
  ``ping_interval_s``; an engine that does not answer it within ``ping_timeout_s``, reports a
  dead worker, or does not end a cancelled request within ``cancel_grace_s`` is *wedged* (alive
  but never answering again): it is killed and restarted, and :attr:`EngineClient.restarted`
  tells the analyst, so no later question queues forever behind it;
* the child's environment is cleaned of QGIS's Python/GDAL/PROJ variables so the engine's own
  wheels are loaded (see :func:`child_environment`); its stderr goes to the QGIS message log.
"""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Union

from qgis.core import Qgis, QgsMessageLog
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from . import paths

LOG_TAG = "RS-LVLM"
RequestId = Union[int, str]

# Error codes produced on the plugin side (the engine's own codes pass through unchanged).
ENGINE_MISSING = "engine_missing"
ENGINE_DIED = "engine_died"
ENGINE_STOPPED = "engine_stopped"
TIMEOUT = "timeout"
SUPERSEDED = "superseded"

# Methods the engine answers on its reading thread: while one runs, a ping waits behind it.
_IMMEDIATE_METHODS = ("info", "ping", "cancel", "shutdown")

_REMOVED_EXACT = {"PYTHONHOME", "PYTHONPATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH",
                  "DYLD_FALLBACK_LIBRARY_PATH"}
_REMOVED_PREFIXES = ("GDAL_", "PROJ_")
_STDERR_TAIL = 20


def child_environment(base: QProcessEnvironment, engine_root: Path) -> QProcessEnvironment:
    """The engine's environment: QGIS's own interpreter and GDAL/PROJ settings removed (they
    would make the engine load QGIS's libraries instead of its wheels' ones), ``PYTHONPATH`` set
    to the folder holding the ``engine`` package, and unbuffered UTF-8 stdio so each reply line
    arrives as soon as it is written."""
    env = QProcessEnvironment(base)
    for key in env.keys():
        if key in _REMOVED_EXACT or key.startswith(_REMOVED_PREFIXES):
            env.remove(key)
    env.insert("PYTHONPATH", str(engine_root))
    env.insert("PYTHONUNBUFFERED", "1")
    env.insert("PYTHONIOENCODING", "utf-8")
    return env


class EngineRequest(QObject):
    """One request in flight.  Exactly one of ``succeeded``/``failed`` is emitted, once."""

    progress = pyqtSignal(int, int, str)  # done, total, message
    token = pyqtSignal(str)
    succeeded = pyqtSignal(object)  # the result dict
    failed = pyqtSignal(str, str)  # code, message

    def __init__(self, request_id: RequestId, method: str, params: Dict[str, Any],
                 timeout_s: float, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.id = request_id
        self.method = method
        self.params = params
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.finished = False
        self.result: Optional[Dict[str, Any]] = None
        self.error: Optional[tuple] = None

    def touch(self) -> None:
        """Any sign of life from the engine restarts the inactivity timeout."""
        self.deadline = time.monotonic() + self.timeout_s

    def finish_ok(self, result: Dict[str, Any]) -> None:
        if not self.finished:
            self.finished = True
            self.result = result
            self.succeeded.emit(result)

    def finish_error(self, code: str, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.error = (code, message)
            self.failed.emit(code, message)


class EngineClient(QObject):
    """Owns the engine subprocess and multiplexes requests over its stdin/stdout."""

    started = pyqtSignal()
    restarted = pyqtSignal(str)  # a message for the analyst
    stderrLine = pyqtSignal(str)

    def __init__(self, python_resolver: Callable[[], Optional[str]],
                 engine_root: Optional[Path] = None, max_restarts: int = 3,
                 parent: Optional[QObject] = None, *, ping_interval_s: float = 10.0,
                 ping_timeout_s: float = 30.0, cancel_grace_s: float = 120.0,
                 serve_arguments: Optional[Callable[[], List[str]]] = None) -> None:
        super().__init__(parent)
        # extra ``serve`` arguments, read at each start (a rebuilt knowledge index, see settings)
        self._serve_arguments = serve_arguments or (lambda: [])
        self._restart_when_idle = False
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self._ping: Optional[tuple] = None  # (request id, time sent) of the health check in flight
        self._last_ping = 0.0
        self._cancelled: Dict[RequestId, float] = {}  # cancelled id -> when its end is overdue
        self._cancel_targets: Dict[RequestId, RequestId] = {}  # cancel request id -> its target
        self._wedged: Optional[str] = None  # why the current process is being killed
        self._resolve_python = python_resolver
        self._engine_root = engine_root or paths.engine_root()
        self._max_restarts = max_restarts
        self._restarts = 0
        self._process: Optional[QProcess] = None
        self._pending: Dict[RequestId, EngineRequest] = {}
        self._stale: Set[RequestId] = set()
        self._outbox: List[bytes] = []
        self._stdout = b""
        self._stderr = b""
        self._stderr_tail: Deque[str] = deque(maxlen=_STDERR_TAIL)
        self._answered = False  # has the current process ever replied?
        self._stopping = False
        self._next_id = 1
        self._current_ask: Optional[EngineRequest] = None
        self._timer = QTimer(self)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._check_deadlines)

    # ------------------------------------------------------------------ public API
    def is_running(self) -> bool:
        return self._process is not None and self._process.state() != QProcess.NotRunning

    def process_id(self) -> int:
        """The engine's OS process id (0 when not running); tests use it to kill the engine."""
        return int(self._process.processId()) if self._process is not None else 0

    def stderr_tail(self) -> List[str]:
        return list(self._stderr_tail)

    def request(self, method: str, params: Optional[Dict[str, Any]] = None,
                timeout_s: float = 120.0) -> EngineRequest:
        """Send a request, starting the engine if needed.  Never blocks; failures to start
        arrive as the request's ``failed`` signal on the next event-loop turn."""
        request_id = self._next_id
        self._next_id += 1
        # no Qt parent: a finished request is freed with its last Python reference instead of
        # accumulating under the long-lived client
        req = EngineRequest(request_id, method, dict(params or {}), timeout_s)
        if not self.is_running() and not self._start():
            python = self._resolve_python()
            message = ("The RS-LVLM engine is not set up: no engine interpreter was found. "
                       "Set one in the plugin settings, set RS_LVLM_ENGINE_PYTHON, or create "
                       "the engine environment from the settings dialog."
                       if not python else
                       "The engine package was not found next to the plugin; reinstall it.")
            QTimer.singleShot(0, lambda: req.finish_error(ENGINE_MISSING, message))
            return req
        self._pending[request_id] = req
        self._send({"id": request_id, "method": method, "params": req.params})
        self._timer.start()
        return req

    def ask(self, params: Dict[str, Any], timeout_s: float = 300.0) -> EngineRequest:
        """Ask a question, superseding any unfinished ``ask``: its late replies are dropped
        and the engine is told to cancel it, so the newest question always wins."""
        previous = self._current_ask
        if previous is not None and not previous.finished:
            self._drop(previous, SUPERSEDED, "A newer question replaced this one.")
        req = self.request("ask", params, timeout_s)
        self._current_ask = req
        return req

    def cancel(self, req: Optional[EngineRequest] = None) -> None:
        """Ask the engine to stop a running request (default: the current ask).  The request
        then ends with the engine's ``cancelled`` error reply."""
        req = req or self._current_ask
        if req is None or req.finished or req.id not in self._pending:
            return
        self._send_cancel(req.id)

    def restart_when_idle(self) -> None:
        """Let the next request start a fresh engine, which reads its arguments again (the
        knowledge index just rebuilt); a request in flight finishes first, nothing is lost."""
        if not self.is_running():
            return
        if self._pending:
            self._restart_when_idle = True
            self._timer.start()
        else:
            self.stop()

    def stop(self, wait_ms: int = 3000) -> None:
        """Shut the engine down politely, killing it if it does not exit in ``wait_ms``.
        Blocks for at most ``wait_ms``; called when the plugin unloads and, with nothing in
        flight, by :meth:`restart_when_idle` (the next request starts a fresh engine)."""
        proc = self._process
        if proc is None:
            return
        self._stopping = True
        if proc.state() == QProcess.Running:
            self._send_internal("shutdown", {})
            proc.waitForBytesWritten(500)
            proc.closeWriteChannel()
            if not proc.waitForFinished(wait_ms):
                proc.kill()
                proc.waitForFinished(1000)
        else:
            proc.kill()
            proc.waitForFinished(1000)
        if self._process is proc:  # finished signal not delivered synchronously
            self._on_gone(proc, "stopped")
        self._timer.stop()

    # ------------------------------------------------------------------ process handling
    def _start(self) -> bool:
        python = self._resolve_python()
        if not python or self._engine_root is None:
            return False
        proc = QProcess(self)
        proc.setProgram(python)
        proc.setArguments(["-m", "engine", "serve", *self._serve_arguments()])
        self._restart_when_idle = False
        proc.setWorkingDirectory(str(self._engine_root))
        proc.setProcessEnvironment(
            child_environment(QProcessEnvironment.systemEnvironment(), self._engine_root))
        proc.setProcessChannelMode(QProcess.SeparateChannels)
        proc.readyReadStandardOutput.connect(lambda p=proc: self._on_stdout(p))
        proc.readyReadStandardError.connect(lambda p=proc: self._on_stderr(p))
        proc.started.connect(lambda p=proc: self._on_started(p))
        proc.errorOccurred.connect(lambda err, p=proc: self._on_error(p, err))
        proc.finished.connect(lambda code, status, p=proc: self._on_finished(p, code, status))
        self._process = proc
        self._stdout = b""
        self._stderr = b""
        self._answered = False
        self._stopping = False
        self._wedged = None
        self._ping = None
        self._cancelled.clear()
        self._cancel_targets.clear()
        QgsMessageLog.logMessage(f"Starting engine: {python} -m engine serve "
                                 f"(in {self._engine_root})", LOG_TAG, Qgis.Info)
        proc.start()
        return True

    def _on_started(self, proc: QProcess) -> None:
        if proc is not self._process:
            return
        outbox, self._outbox = self._outbox, []
        for data in outbox:
            proc.write(data)
        self.started.emit()

    def _send(self, message: Dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        proc = self._process
        if proc is not None and proc.state() == QProcess.Running:
            proc.write(data)
        else:
            self._outbox.append(data)  # flushed by _on_started

    def _send_internal(self, method: str, params: Dict[str, Any]) -> RequestId:
        """A request whose reply nobody waits for (cancel, shutdown, ping): its id is marked stale."""
        request_id = self._next_id
        self._next_id += 1
        self._stale.add(request_id)
        self._send({"id": request_id, "method": method, "params": params})
        return request_id

    def _send_cancel(self, target: RequestId) -> None:
        """Ask the engine to cancel ``target``; if it never ends it, the engine is wedged."""
        self._cancelled.setdefault(target, time.monotonic() + self.cancel_grace_s)
        self._cancel_targets[self._send_internal("cancel", {"target": target})] = target
        self._timer.start()

    def _drop(self, req: EngineRequest, code: str, message: str) -> None:
        """Forget a request: fail it now, drop its late replies, and cancel it in the engine."""
        if req.id in self._pending:
            self._pending.pop(req.id)
            self._stale.add(req.id)
            if req.method not in _IMMEDIATE_METHODS and self.is_running():
                self._send_cancel(req.id)
        req.finish_error(code, message)

    def _on_stdout(self, proc: QProcess) -> None:
        if proc is not self._process:
            return
        self._stdout += bytes(proc.readAllStandardOutput())
        *lines, self._stdout = self._stdout.split(b"\n")
        for line in lines:
            if line.strip():
                self._dispatch(line)

    def _on_stderr(self, proc: QProcess) -> None:
        self._stderr += bytes(proc.readAllStandardError())
        *lines, self._stderr = self._stderr.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                QgsMessageLog.logMessage(line, LOG_TAG, Qgis.Info)
                self.stderrLine.emit(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            QgsMessageLog.logMessage(f"Engine wrote a non-JSON line: {line[:200]!r}",
                                     LOG_TAG, Qgis.Warning)
            return
        if not isinstance(message, dict):
            return
        self._answered = True
        self._restarts = 0  # a healthy engine earns back its restart budget
        request_id = message.get("id")
        kind = message.get("type")
        terminal = kind in ("result", "error")
        if request_id in self._cancelled:
            if terminal:
                self._cancelled.pop(request_id, None)
            else:  # still working on it: the grace starts again
                self._cancelled[request_id] = time.monotonic() + self.cancel_grace_s
        if request_id in self._cancel_targets and terminal:
            target = self._cancel_targets.pop(request_id)
            result = message.get("result")
            if not (isinstance(result, dict) and result.get("cancelled")):  # it had ended already
                self._cancelled.pop(target, None)
        if self._ping is not None and request_id == self._ping[0] and terminal:
            self._ping = None
            result = message.get("result")
            if isinstance(result, dict) and result.get("worker_alive") is False:
                self._restart_wedged("its worker thread died")
        if request_id in self._stale:
            if terminal:
                self._stale.discard(request_id)
            return
        req = self._pending.get(request_id)
        if req is None:
            if kind == "error":
                err = message.get("error") or {}
                QgsMessageLog.logMessage(f"Engine error without request: {err.get('message')}",
                                         LOG_TAG, Qgis.Warning)
            return
        req.touch()
        if kind == "progress":
            req.progress.emit(int(message.get("done") or 0), int(message.get("total") or 0),
                              str(message.get("message") or ""))
        elif kind == "token":
            req.token.emit(str(message.get("text") or ""))
        elif kind == "result":
            self._pending.pop(request_id, None)
            result = message.get("result")
            req.finish_ok(result if isinstance(result, dict) else {"value": result})
        elif kind == "error":
            self._pending.pop(request_id, None)
            err = message.get("error") or {}
            req.finish_error(str(err.get("code") or "error"), str(err.get("message") or ""))

    def _on_error(self, proc: QProcess, error: int) -> None:
        if error == QProcess.FailedToStart:
            self._on_gone(proc, f"could not be started ({proc.program()}: {proc.errorString()})",
                          code=ENGINE_MISSING)

    def _on_finished(self, proc: QProcess, code: int, status: int) -> None:
        how = "crashed" if status == QProcess.CrashExit else f"exited with status {code}"
        self._on_gone(proc, how)

    def _restart_wedged(self, reason: str) -> None:
        """Kill an engine that is alive but no longer answering; :meth:`_on_gone` restarts it."""
        proc = self._process
        if proc is None or self._wedged is not None or self._stopping:
            return
        self._wedged = reason
        QgsMessageLog.logMessage(f"Engine wedged ({reason}); killing it.", LOG_TAG, Qgis.Warning)
        proc.kill()

    def _on_gone(self, proc: QProcess, how: str, code: str = ENGINE_DIED) -> None:
        """The engine process ended: fail what was outstanding and restart if that is useful."""
        if proc is not self._process:
            return
        wedged = self._wedged
        self._on_stdout(proc)  # replies written just before exiting still count
        self._on_stderr(proc)
        self._process = None
        proc.deleteLater()
        outstanding = [r for r in self._pending.values() if not r.finished]
        self._pending.clear()
        self._stale.clear()
        self._outbox.clear()
        self._cancelled.clear()
        self._cancel_targets.clear()
        self._ping = None
        if wedged is not None and not self._stopping:
            self._restarts += 1
            message = (f"The engine stopped responding ({wedged}) and was restarted; ask again.")
            for req in outstanding:
                req.finish_error(ENGINE_DIED, message)
            if self._restarts <= self._max_restarts:
                self._start()
            self.restarted.emit(message)
            return
        if self._stopping:
            for req in outstanding:
                req.finish_error(ENGINE_STOPPED, "The engine was stopped.")
            return
        QgsMessageLog.logMessage(f"Engine {how}.", LOG_TAG, Qgis.Warning)
        if not outstanding:
            return  # idle exit: the next request starts a fresh engine
        tail = "\n".join(self._stderr_tail)
        if code == ENGINE_MISSING:
            message = f"The engine {how}. Check the engine interpreter in the RS-LVLM settings."
            for req in outstanding:
                req.finish_error(code, message)
            return
        if not self._answered or self._restarts >= self._max_restarts:
            message = (f"The engine {how} before answering; see the RS-LVLM log."
                       + (f"\n{tail}" if tail else ""))
            for req in outstanding:
                req.finish_error(code, message)
            return
        self._restarts += 1
        message = f"The engine {how} during a request and was restarted; ask again."
        for req in outstanding:
            req.finish_error(ENGINE_DIED, message)
        self._start()
        self.restarted.emit(message)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for req in [r for r in self._pending.values() if r.deadline < now]:
            self._drop(req, TIMEOUT, f"The engine did not answer within {req.timeout_s:.0f} s.")
        self._check_health(now)
        if not self._pending and self._restart_when_idle:
            self._restart_when_idle = False
            self.stop()
        if not self._pending and not self._cancelled and self._ping is None:
            self._timer.stop()

    def _check_health(self, now: float) -> None:
        """Ping while requests are outstanding; a missed ping or an unending cancel is a wedge."""
        if not self.is_running() or self._wedged is not None:
            return
        overdue = [rid for rid, deadline in self._cancelled.items() if deadline < now]
        if overdue:
            self._restart_wedged(f"a cancelled request did not end within {self.cancel_grace_s:.0f} s")
            return
        if self._ping is not None:
            if now - self._ping[1] > self.ping_timeout_s:
                self._restart_wedged(f"no answer to a health check within {self.ping_timeout_s:.0f} s")
            return
        # The reading thread is busy while an immediate method (info loading a model) runs.
        busy = any(r.method in _IMMEDIATE_METHODS for r in self._pending.values())
        if self._pending and self._answered and not busy and now - self._last_ping >= self.ping_interval_s:
            self._last_ping = now
            self._ping = (self._send_internal("ping", {}), now)
