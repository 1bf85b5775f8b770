"""The JSON-lines protocol server behind ``python -m engine serve``.

Why a thread: the analyst must be able to cancel a running answer, so the main thread keeps
reading stdin while one worker thread runs the requests that take time (``ask``), one at a time
and in arrival order. ``info``, ``cancel`` and ``shutdown`` are answered at once. Every line that
cannot be understood gets an error reply (id null when none could be read) and the server goes
on: a bad line from a buggy client must never cost the analyst a loaded model.

Only protocol lines go to stdout; logs go to stderr.
"""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from typing import IO, Any, Callable

from ..errors import BAD_REQUEST, CANCELLED, INTERNAL, EngineError

log = logging.getLogger("engine.server")

# Methods answered on the reading thread (fast) and on the worker thread (slow).
IMMEDIATE_METHODS = ("info", "cancel", "shutdown", "ping")
QUEUED_METHODS = ("ask",)

Handler = Callable[[dict, "RequestContext"], dict]


class RequestContext:
    """What a running request may do: report progress, stream tokens, notice a cancel."""

    def __init__(self, server: "ProtocolServer", request_id: Any) -> None:
        self._server = server
        self.request_id = request_id
        self.cancel_event = threading.Event()

    def progress(self, done: int, total: int, message: str = "") -> None:
        self._server.send({"id": self.request_id, "type": "progress", "done": done, "total": total, "message": message})

    def token(self, text: str) -> None:
        self._server.send({"id": self.request_id, "type": "token", "text": text})

    def should_stop(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise EngineError(CANCELLED, "the request was cancelled")


class ProtocolServer:
    """Reads requests from ``stdin``, writes replies to ``stdout``; see DESIGN.md's contract."""

    def __init__(self, handlers: dict[str, Handler], stdin: IO[bytes] | None = None,
                 stdout: IO[str] | None = None) -> None:
        self.handlers = handlers
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.stdout = stdout if stdout is not None else sys.stdout
        self._write_lock = threading.Lock()
        self._queue: "queue.Queue[tuple[dict, RequestContext] | None]" = queue.Queue()
        self._contexts: dict[Any, RequestContext] = {}
        self._contexts_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._stopping = threading.Event()

    # -- output -----------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        line = json.dumps(message, ensure_ascii=False, default=str)
        with self._write_lock:
            self.stdout.write(line + "\n")
            self.stdout.flush()

    def send_error(self, request_id: Any, code: str, message: str) -> None:
        self.send({"id": request_id, "type": "error", "error": {"code": code, "message": message}})

    # -- main loop --------------------------------------------------------------------------
    def serve_forever(self) -> int:
        self._worker.start()
        log.info("engine server ready")
        shutdown_requested = False
        for raw in self.stdin:
            if not raw.strip():
                continue
            request = self._parse(raw)
            if request is None:
                continue
            if self._dispatch(request):
                shutdown_requested = True
                break
        # An explicit shutdown cancels what is running; end of input lets queued work finish.
        self._stopping.set()
        if shutdown_requested:
            self._cancel_all()
        self._queue.put(None)
        self._worker.join(timeout=None if not shutdown_requested else 30)
        return 0

    def _parse(self, raw: bytes) -> dict | None:
        """Decode one line into a request, answering malformed ones with an error reply."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.send_error(None, BAD_REQUEST, "request line is not valid UTF-8")
            return None
        try:
            request = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            self.send_error(None, BAD_REQUEST, f"malformed JSON: {exc}")
            return None
        if not isinstance(request, dict):
            self.send_error(None, BAD_REQUEST, "a request must be a JSON object with id, method and params")
            return None
        request_id = request.get("id")
        if isinstance(request_id, (dict, list)):
            self.send_error(None, BAD_REQUEST, "request id must be a string, a number or null")
            return None
        method = request.get("method")
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(method, str):
            self.send_error(request_id, BAD_REQUEST, "request has no method (a string)")
            return None
        if method not in self.handlers:
            self.send_error(request_id, BAD_REQUEST,
                            f"unknown method {method!r}; known: {', '.join(sorted(self.handlers))}")
            return None
        if not isinstance(params, dict):
            self.send_error(request_id, BAD_REQUEST, "params must be a JSON object")
            return None
        return {"id": request_id, "method": method, "params": params}

    def _dispatch(self, request: dict) -> bool:
        """Run or queue one request; return True when the server should stop reading."""
        method, request_id, params = request["method"], request["id"], request["params"]
        if method == "cancel":
            target = params.get("target", params.get("id"))
            cancelled = self._cancel(target)
            self.send({"id": request_id, "type": "result", "result": {"cancelled": cancelled, "target": target}})
            return False
        if method == "shutdown":
            self.send({"id": request_id, "type": "result", "result": {"shutdown": True}})
            return True
        context = RequestContext(self, request_id)
        if method in QUEUED_METHODS:
            with self._contexts_lock:
                self._contexts[request_id] = context
            self._queue.put((request, context))
            return False
        self._run(request, context)
        return False

    def _cancel(self, target: Any) -> bool:
        with self._contexts_lock:
            context = self._contexts.get(target) if target is not None else None
            if target is None:  # no target: cancel everything pending or running
                for ctx in self._contexts.values():
                    ctx.cancel_event.set()
                return bool(self._contexts)
        if context is None:
            return False
        context.cancel_event.set()
        return True

    def _cancel_all(self) -> None:
        with self._contexts_lock:
            for ctx in self._contexts.values():
                ctx.cancel_event.set()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, context = item
            try:
                self._run(request, context)
            finally:
                with self._contexts_lock:
                    self._contexts.pop(request["id"], None)

    def _run(self, request: dict, context: RequestContext) -> None:
        """Call the handler and send exactly one result or error reply."""
        try:
            context.check_cancelled()
            result = self.handlers[request["method"]](request["params"], context)
        except EngineError as exc:
            self.send_error(request["id"], exc.code, exc.message)
        except Exception as exc:  # a bug must not kill the server: report it and keep serving
            log.exception("request %r failed", request["id"])
            self.send_error(request["id"], INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            self.send({"id": request["id"], "type": "result", "result": result})
