"""The JSON-lines protocol server behind ``python -m engine serve``.

Why a thread: the analyst must be able to cancel a running answer, so the main thread keeps
reading stdin while one worker thread runs the requests that take time (``ask``), one at a time
and in arrival order. ``info``, ``ping``, ``cancel`` and ``shutdown`` are answered at once.

What no line may do (each is a test in tests/engine/test_protocol_server.py and the fuzz suite):

* kill the server: every line that cannot be understood gets an error reply (id null when none
  could be read) and the server goes on; every reply goes through :mod:`engine.protocol.wire`,
  whose encoder cannot throw and writes strict JSON only;
* wedge it: the worker is supervised. An exception anywhere in it (even while replying) still
  gives the request one error reply, and a worker that died anyway is restarted before the next
  queued request; ``ping`` reports the worker's state so a client can notice a stuck request;
* confuse it: ids are strings or integers only (never bools or floats, so ``1``, ``1.0`` and
  ``true`` cannot share a slot), unique among the requests in flight, and ``cancel`` accepts a
  target of any JSON type without throwing.

Only protocol lines go to stdout; logs go to stderr.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import IO, Any, Callable, Iterable

from ..errors import BAD_REQUEST, CANCELLED, INTERNAL, EngineError
from . import wire

log = logging.getLogger("engine.server")

# Methods answered by the server itself, on the reading thread.
BUILTIN_METHODS = ("cancel", "shutdown", "ping")
# Methods answered on the reading thread (fast); every other method runs on the worker thread.
IMMEDIATE_METHODS = ("info", "cancel", "shutdown", "ping")

Handler = Callable[[dict, "RequestContext"], dict]


class RequestContext:
    """What a running request may do: report progress, stream tokens, notice a cancel."""

    def __init__(self, server: "ProtocolServer", request_id: Any) -> None:
        self._server = server
        self.request_id = request_id
        self.cancel_event = threading.Event()
        self.answered = False          # the one result or error reply has been sent
        self.started: float | None = None

    def progress(self, done: int, total: int, message: str = "") -> None:
        self._server.send({"id": self.request_id, "type": "progress", "done": done, "total": total,
                           "message": message})

    def token(self, text: str) -> None:
        self._server.send({"id": self.request_id, "type": "token", "text": text})

    def should_stop(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise EngineError(CANCELLED, "the request was cancelled")


class ProtocolServer:
    """Reads requests from ``stdin``, writes replies to ``stdout``; see docs/protocol.md."""

    def __init__(self, handlers: dict[str, Handler], stdin: IO[bytes] | Iterable[bytes] | None = None,
                 stdout: IO[str] | None = None) -> None:
        self.handlers = handlers
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.stdout = stdout if stdout is not None else sys.stdout
        self._write_lock = threading.Lock()
        self._queue: "queue.Queue[tuple[dict, RequestContext] | None]" = queue.Queue()
        self._contexts: dict[Any, RequestContext] = {}   # queued or running, by id
        self._contexts_lock = threading.Lock()
        self._running: RequestContext | None = None
        self._stopping = threading.Event()
        self._worker = self._new_worker()
        self.worker_restarts = 0

    # -- output -----------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        """Write one reply line; a closed stdout (the client went away) is logged, not raised."""
        line = wire.encode(message)
        with self._write_lock:
            try:
                self.stdout.write(line + "\n")
                self.stdout.flush()
            except (OSError, ValueError) as exc:
                log.warning("could not write a reply (%s); is the client gone?", exc)

    def send_error(self, request_id: Any, code: str, message: str) -> None:
        self.send({"id": request_id, "type": "error", "error": {"code": code, "message": message}})

    # -- main loop --------------------------------------------------------------------------
    def serve_forever(self) -> int:
        self._worker.start()
        log.info("engine server ready")
        shutdown_requested = False
        for raw in wire.bounded_lines(self.stdin):
            if raw is None:
                self.send_error(None, BAD_REQUEST, f"request line longer than {wire.MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                request = self._parse(raw)
                if request is not None and self._dispatch(request):
                    shutdown_requested = True
                    break
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the server
                log.exception("could not handle a request line")
                self.send_error(None, INTERNAL, f"{type(exc).__name__}: {exc}")
        # An explicit shutdown cancels what is running; end of input lets queued work finish.
        self._stopping.set()
        if shutdown_requested:
            self._cancel_all()
        self._ensure_worker()
        self._queue.put(None)
        self._worker.join(timeout=None if not shutdown_requested else 30)
        return 0

    def _parse(self, raw: bytes) -> dict | None:
        """Decode one line into a request, answering malformed ones with an error reply."""
        try:
            request = wire.decode(raw)
        except wire.WireError as exc:
            self.send_error(None, BAD_REQUEST, str(exc))
            return None
        if not isinstance(request, dict):
            self.send_error(None, BAD_REQUEST, "a request must be a JSON object with id, method and params")
            return None
        request_id = request.get("id")
        if request_id is not None and not wire.is_valid_id(request_id):
            self.send_error(None, BAD_REQUEST, f"request id must be a string (at most {wire.MAX_ID_CHARS} "
                                               "characters) or a 64-bit integer")
            return None
        method = request.get("method")
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(method, str):
            self.send_error(request_id, BAD_REQUEST, "request has no method (a string)")
            return None
        known = set(self.handlers) | set(BUILTIN_METHODS)
        if method not in known:
            self.send_error(request_id, BAD_REQUEST,
                            f"unknown method {method[:80]!r}; known: {', '.join(sorted(known))}")
            return None
        if not isinstance(params, dict):
            self.send_error(request_id, BAD_REQUEST, "params must be a JSON object")
            return None
        return {"id": request_id, "method": method, "params": params}

    def _dispatch(self, request: dict) -> bool:
        """Run or queue one request; return True when the server should stop reading."""
        method, request_id, params = request["method"], request["id"], request["params"]
        if method == "cancel":
            self._answer_cancel(request_id, params)
            return False
        if method == "shutdown":
            self.send({"id": request_id, "type": "result", "result": {"shutdown": True}})
            return True
        if method == "ping":
            self.send({"id": request_id, "type": "result", "result": self._health()})
            return False
        context = RequestContext(self, request_id)
        if method not in IMMEDIATE_METHODS:
            if request_id is None:
                self.send_error(None, BAD_REQUEST, f"a {method} request needs an id (a string or an integer) "
                                                   "so its replies can be matched and cancelled")
                return False
            with self._contexts_lock:
                if request_id in self._contexts:
                    duplicate = True
                else:
                    duplicate = False
                    self._contexts[request_id] = context
            if duplicate:
                self.send_error(None, BAD_REQUEST, f"id {request_id!r} is already used by a request in flight; "
                                                   "give every request its own id")
                return False
            self._ensure_worker()
            self._queue.put((request, context))
            return False
        self._run(request, context)
        return False

    # -- cancel -----------------------------------------------------------------------------
    def _answer_cancel(self, request_id: Any, params: dict) -> None:
        target = params.get("target", params.get("id"))
        if target is not None and not wire.is_valid_id(target):
            self.send_error(request_id, BAD_REQUEST, "cancel target must be the id (a string or an integer) "
                                                     "of a request, or absent to cancel everything")
            return
        self.send({"id": request_id, "type": "result", "result": {"cancelled": self._cancel(target),
                                                                  "target": target}})

    def _cancel(self, target: Any) -> bool:
        with self._contexts_lock:
            if target is None:  # no target: cancel everything pending or running
                for ctx in self._contexts.values():
                    ctx.cancel_event.set()
                return bool(self._contexts)
            context = self._contexts.get(target)
        if context is None:
            return False
        context.cancel_event.set()
        return True

    def _cancel_all(self) -> None:
        self._cancel(None)

    # -- the supervised worker ----------------------------------------------------------------
    def _new_worker(self) -> threading.Thread:
        return threading.Thread(target=self._supervise, name="engine-worker", daemon=True)

    def _ensure_worker(self) -> None:
        """Restart the worker if it died (it should not: see :meth:`_supervise`)."""
        if self._worker.ident is not None and not self._worker.is_alive():
            log.error("the worker thread had died; restarting it")
            self._answer_orphan()
            self.worker_restarts += 1
            self._worker = self._new_worker()
            self._worker.start()

    def _supervise(self) -> None:
        """Run :meth:`_work` until it returns normally, whatever it raises meanwhile."""
        while True:
            try:
                self._work()
                return
            except BaseException:  # noqa: BLE001 - keep serving; the request got its error reply
                log.exception("the worker failed; it goes on with the next request")
                self._answer_orphan()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, context = item
            self._running = context
            try:
                self._run(request, context)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a handler, a failed reply...
                log.exception("request %r failed outside its handler", request["id"])
                self._reply_once(context, {"id": request["id"], "type": "error",
                                           "error": {"code": INTERNAL, "message": f"{type(exc).__name__}: {exc}"}})
            finally:
                self._running = None
                with self._contexts_lock:
                    self._contexts.pop(request["id"], None)

    def _answer_orphan(self) -> None:
        """Give the request that was running when the worker failed its one error reply."""
        context = self._running
        self._running = None
        if context is None:
            return
        self._reply_once(context, {"id": context.request_id, "type": "error",
                                   "error": {"code": INTERNAL, "message": "the request's worker failed"}})
        with self._contexts_lock:
            self._contexts.pop(context.request_id, None)

    def _reply_once(self, context: RequestContext, message: dict) -> None:
        """Send a request's terminal reply unless it went out already (marked only once sent)."""
        if not context.answered:
            self.send(message)
            context.answered = True

    def _health(self) -> dict:
        """``ping``'s answer: whether the worker lives, and how long the running request has run."""
        self._ensure_worker()
        running = self._running
        with self._contexts_lock:
            in_flight = len(self._contexts)
        return {"pong": True, "worker_alive": self._worker.is_alive() or self._worker.ident is None,
                "worker_restarts": self.worker_restarts, "in_flight": in_flight,
                "running": None if running is None else running.request_id,
                "running_s": None if running is None or running.started is None
                else round(time.monotonic() - running.started, 3)}

    def _run(self, request: dict, context: RequestContext) -> None:
        """Call the handler and send exactly one result or error reply."""
        context.started = time.monotonic()
        try:
            context.check_cancelled()
            result = self.handlers[request["method"]](request["params"], context)
        except EngineError as exc:
            message = {"id": request["id"], "type": "error", "error": {"code": exc.code, "message": exc.message}}
        except (Exception, SystemExit) as exc:  # a bug must not kill the server: report it, go on
            log.exception("request %r failed", request["id"])
            message = {"id": request["id"], "type": "error",
                       "error": {"code": INTERNAL, "message": f"{type(exc).__name__}: {exc}"}}
        else:
            message = {"id": request["id"], "type": "result", "result": result}
        self._reply_once(context, message)
