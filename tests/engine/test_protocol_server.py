"""The JSON-lines server: every line gets an answer, bad lines never stop it (docs/protocol.md)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import EngineError
from engine.protocol.server import ProtocolServer

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_lines(lines: list[bytes], handlers: dict) -> list[dict]:
    """Run an in-process server over the given input lines and return its replies."""
    out = io.StringIO()
    ProtocolServer(handlers, stdin=io.BytesIO(b"\n".join(lines) + b"\n"), stdout=out).serve_forever()
    return [json.loads(line) for line in out.getvalue().splitlines()]


ECHO = {"echo": lambda params, ctx: {"params": params}, "info": lambda params, ctx: {"ok": True},
        "cancel": lambda p, c: {}, "shutdown": lambda p, c: {}}


def test_result_reply_carries_request_id():
    replies = run_lines([b'{"id": 7, "method": "info", "params": {}}'], ECHO)
    assert replies == [{"id": 7, "type": "result", "result": {"ok": True}}]


def test_malformed_json_gets_error_with_null_id_and_server_continues():
    replies = run_lines([b'{"id": 1, "method": "info"', b'{"id": 2, "method": "info"}'], ECHO)
    assert replies[0]["id"] is None and replies[0]["type"] == "error"
    assert replies[0]["error"]["code"] == "bad_request"
    assert replies[1] == {"id": 2, "type": "result", "result": {"ok": True}}


def test_unknown_method_gets_error_naming_it():
    replies = run_lines([b'{"id": "a", "method": "fly", "params": {}}'], ECHO)
    assert replies[0]["id"] == "a" and "fly" in replies[0]["error"]["message"]


def test_params_of_wrong_type_get_bad_request():
    replies = run_lines([b'{"id": 3, "method": "info", "params": [1, 2]}'], ECHO)
    assert replies[0]["type"] == "error" and replies[0]["error"]["code"] == "bad_request"


def test_invalid_utf8_gets_error():
    replies = run_lines([b'\xff\xfe{"id": 1}'], ECHO)
    assert replies[0]["type"] == "error" and replies[0]["id"] is None


def test_handler_engine_error_becomes_error_reply_with_its_code():
    def fail(params, ctx):
        raise EngineError("region_off_raster", "the region lies outside the raster")

    replies = run_lines([b'{"id": 1, "method": "ask", "params": {}}'], {**ECHO, "ask": fail})
    assert replies == [{"id": 1, "type": "error",
                        "error": {"code": "region_off_raster", "message": "the region lies outside the raster"}}]


def test_handler_bug_becomes_internal_error_and_server_goes_on():
    def crash(params, ctx):
        raise ZeroDivisionError("boom")

    replies = run_lines([b'{"id": 1, "method": "ask", "params": {}}', b'{"id": 2, "method": "info"}'],
                        {**ECHO, "ask": crash})
    by_id = {r["id"]: r for r in replies}
    assert by_id[1]["error"]["code"] == "internal" and by_id[2]["type"] == "result"


def test_progress_and_tokens_come_before_the_single_result():
    def ask(params, ctx):
        ctx.progress(0, 2, "start")
        for piece in ("an ", "airport"):
            ctx.token(piece)
        ctx.progress(2, 2, "done")
        return {"text": "an airport"}

    replies = run_lines([b'{"id": 5, "method": "ask", "params": {}}'], {**ECHO, "ask": ask})
    assert [r["type"] for r in replies] == ["progress", "token", "token", "progress", "result"]
    assert all(r["id"] == 5 for r in replies)


def test_cancel_stops_a_running_ask_between_tokens():
    started = threading.Event()

    def slow_ask(params, ctx):
        for _ in range(500):
            started.set()
            ctx.token("x")
            if ctx.should_stop():
                ctx.check_cancelled()
            time.sleep(0.01)
        return {"text": "finished"}

    class SlowInput(io.RawIOBase):
        """Feeds the ask, waits until it runs, then sends the cancel: like a real client."""
        def __init__(self):
            self.lines = [b'{"id": 1, "method": "ask", "params": {}}\n',
                          b'{"id": 2, "method": "cancel", "params": {"target": 1}}\n']

        def __iter__(self):
            yield self.lines[0]
            started.wait(5)
            yield self.lines[1]

    out = io.StringIO()
    ProtocolServer({**ECHO, "ask": slow_ask}, stdin=SlowInput(), stdout=out).serve_forever()
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    final = [r for r in replies if r["id"] == 1 and r["type"] in ("result", "error")]
    assert len(final) == 1 and final[0]["type"] == "error" and final[0]["error"]["code"] == "cancelled"
    assert {"id": 2, "type": "result", "result": {"cancelled": True, "target": 1}} in replies


def strict_loads(line: str):
    """Parse a reply as strict JSON: NaN / Infinity are refused, as strict clients do."""
    def refuse(name):
        raise ValueError(f"non-strict constant {name}")
    return json.loads(line, parse_constant=refuse)


def run_raw(lines: list[bytes], handlers: dict, stdout=None) -> list[dict]:
    """Like run_lines, parsing every reply strictly and checking each is pure ASCII."""
    out = stdout or io.StringIO()
    ProtocolServer(handlers, stdin=io.BytesIO(b"\n".join(lines) + b"\n"), stdout=out).serve_forever()
    text = out.getvalue()
    assert text.isascii()
    return [strict_loads(line) for line in text.splitlines()]


def test_nan_and_infinity_in_a_result_become_null():
    handlers = {**ECHO, "ask": lambda p, c: {"score": float("nan"), "big": float("inf"), "ok": 1.5}}
    replies = run_raw([b'{"id": 1, "method": "ask"}'], handlers)
    assert replies == [{"id": 1, "type": "result", "result": {"score": None, "big": None, "ok": 1.5}}]


def test_lone_surrogate_in_a_result_is_replaced_not_fatal():
    handlers = {**ECHO, "ask": lambda p, c: {"text": "a\ud800b"}}
    by_id = {r["id"]: r for r in run_raw([b'{"id": 1, "method": "ask"}', b'{"id": 2, "method": "info"}'], handlers)}
    assert by_id[1]["result"]["text"] == "a\ufffdb" and by_id[2]["type"] == "result"


def test_unencodable_objects_in_a_result_are_written_as_text():
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    handlers = {**ECHO, "ask": lambda p, c: {"obj": Unprintable(), (1, 2): {3}, "deep": [[[[]]]]}}
    replies = run_raw([b'{"id": 1, "method": "ask"}'], handlers)
    assert replies[0]["result"] == {"obj": "<unprintable>", "(1, 2)": [3], "deep": [[[[]]]]}


@pytest.mark.parametrize("line", [b'{"id": 1, "method": "info", "params": {"x": NaN}}',
                                  b'{"id": 1, "method": "info", "params": {"x": -Infinity}}',
                                  b'{"id": 1, "method": "info", "params": {"x": 1e999}}'])
def test_non_strict_numbers_in_a_request_are_refused(line):
    replies = run_raw([line], ECHO)
    assert replies[0]["type"] == "error" and replies[0]["error"]["code"] == "bad_request"


@pytest.mark.parametrize("bad_id", [b"1.0", b"true", b"false", b"[1]", b'{"a": 1}', b'"\\ud800"',
                                    b"99999999999999999999", b'"' + b"x" * 300 + b'"'])
def test_ids_other_than_strings_and_integers_are_refused_with_id_null(bad_id):
    replies = run_raw([b'{"id": ' + bad_id + b', "method": "info"}'], ECHO)
    assert replies == [{"id": None, "type": "error", "error": {"code": "bad_request",
                                                             "message": replies[0]["error"]["message"]}}]
    assert "id" in replies[0]["error"]["message"]


def test_an_ask_without_id_is_refused():
    replies = run_raw([b'{"method": "ask", "params": {}}'], {**ECHO, "ask": lambda p, c: {}})
    assert replies[0]["type"] == "error" and replies[0]["id"] is None


def _blocking_ask(release: threading.Event, started: threading.Event):
    def ask(params, ctx):
        started.set()
        release.wait(10)
        ctx.check_cancelled()
        return {"n": params.get("n")}
    return ask


class ScriptedInput(io.RawIOBase):
    """Yields lines one by one, waiting on an event before the lines marked with one."""

    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        for step in self.steps:
            if isinstance(step, threading.Event):
                step.wait(10)
            elif callable(step):
                step()
            else:
                yield step + b"\n"


def test_a_duplicate_of_an_id_in_flight_is_refused_and_the_first_request_still_answers():
    release, started = threading.Event(), threading.Event()
    out = io.StringIO()
    steps = [b'{"id": 1, "method": "ask", "params": {"n": "first"}}', started,
             b'{"id": 1, "method": "ask", "params": {"n": "second"}}', release.set]
    ProtocolServer({**ECHO, "ask": _blocking_ask(release, started)}, stdin=ScriptedInput(steps),
                   stdout=out).serve_forever()
    replies = [strict_loads(line) for line in out.getvalue().splitlines()]
    assert replies[0]["id"] is None and replies[0]["error"]["code"] == "bad_request"
    assert "already" in replies[0]["error"]["message"]
    assert replies[1:] == [{"id": 1, "type": "result", "result": {"n": "first"}}]


def test_an_id_can_be_used_again_once_its_request_has_finished():
    out = io.StringIO()
    server = ProtocolServer({**ECHO, "ask": lambda p, c: {"n": p["n"]}}, stdout=out)

    def until_nothing_in_flight():
        for _ in range(1000):
            if out.getvalue() and not server._contexts:
                return
            time.sleep(0.01)

    server.stdin = ScriptedInput([b'{"id": 1, "method": "ask", "params": {"n": 1}}', until_nothing_in_flight,
                                  b'{"id": 1, "method": "ask", "params": {"n": 2}}'])
    server.serve_forever()
    assert [strict_loads(r)["result"]["n"] for r in out.getvalue().splitlines()] == [1, 2]


def test_cancel_hits_the_running_request_and_integer_and_string_ids_differ():
    release, started = threading.Event(), threading.Event()
    out = io.StringIO()
    steps = [b'{"id": 1, "method": "ask", "params": {"n": 1}}', started,
             b'{"id": "1", "method": "ask", "params": {"n": 2}}',
             b'{"id": "c", "method": "cancel", "params": {"target": 1}}', release.set]
    ProtocolServer({**ECHO, "ask": _blocking_ask(release, started)}, stdin=ScriptedInput(steps),
                   stdout=out).serve_forever()
    final = {r["id"]: r for r in map(strict_loads, out.getvalue().splitlines())}
    assert final[1]["error"]["code"] == "cancelled"
    assert final["1"] == {"id": "1", "type": "result", "result": {"n": 2}}
    assert final["c"]["result"] == {"cancelled": True, "target": 1}


@pytest.mark.parametrize("target", [b"[9]", b'{"a": [1]}', b"1.5", b"true", b'"\\udfff"'])
def test_cancel_with_a_target_of_any_json_type_answers_and_the_server_goes_on(target):
    replies = run_raw([b'{"id": "c", "method": "cancel", "params": {"target": ' + target + b"}}",
                       b'{"id": 2, "method": "info"}'], ECHO)
    assert replies[0]["id"] == "c" and replies[0]["error"]["code"] == "bad_request"
    assert replies[1] == {"id": 2, "type": "result", "result": {"ok": True}}


def test_a_handler_raising_system_exit_gets_an_internal_error_and_the_worker_goes_on():
    def leave(params, ctx):
        raise SystemExit(3)

    replies = run_raw([b'{"id": 1, "method": "ask"}', b'{"id": 2, "method": "echo", "params": {"a": 1}}'],
                      {**ECHO, "ask": leave})
    assert replies[0]["id"] == 1 and replies[0]["error"]["code"] == "internal"
    assert replies[1] == {"id": 2, "type": "result", "result": {"params": {"a": 1}}}


class FailingOnce(io.StringIO):
    """A stdout whose first write of a result fails (as a reply that cannot be written would)."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def write(self, text):
        if not self.failed and '"result"' in text:
            self.failed = True
            raise RuntimeError("write failed")
        return super().write(text)


def test_a_reply_that_fails_inside_the_worker_still_gives_one_error_and_the_worker_lives():
    replies = run_raw([b'{"id": 1, "method": "ask"}', b'{"id": 2, "method": "ask"}'],
                      {**ECHO, "ask": lambda p, c: {"ok": True}}, stdout=FailingOnce())
    assert replies[0]["id"] == 1 and replies[0]["error"]["code"] == "internal"
    assert replies[1] == {"id": 2, "type": "result", "result": {"ok": True}}


def test_a_worker_that_has_died_is_restarted_and_runs_the_next_ask():
    out = io.StringIO()
    server = ProtocolServer({**ECHO, "ask": lambda p, c: {"n": p["n"]}}, stdout=out,
                            stdin=io.BytesIO(b""))
    server._queue.put(None)          # makes the worker thread return at once: a dead worker
    server._worker.start()
    server._worker.join(5)
    server.stdin = ScriptedInput([b'{"id": 1, "method": "ask", "params": {"n": 7}}'])
    server._worker = threading.Thread(target=lambda: None)  # serve_forever starts this one
    server.serve_forever()
    assert strict_loads(out.getvalue().splitlines()[0]) == {"id": 1, "type": "result", "result": {"n": 7}}
    assert server.worker_restarts >= 1


def test_ping_reports_the_worker_alive():
    replies = run_raw([b'{"id": "p", "method": "ping"}'], ECHO)
    assert replies[0]["result"]["pong"] is True and replies[0]["result"]["worker_alive"] is True


def test_an_over_long_line_gets_an_error_and_the_next_line_is_answered():
    from engine.protocol import wire

    long_line = b'{"id": 1, "method": "info", "params": {"x": "' + b"a" * (wire.MAX_LINE_BYTES + 10) + b'"}}'
    replies = run_raw([long_line, b'{"id": 2, "method": "info"}'], ECHO)
    assert replies[0]["id"] is None and "longer" in replies[0]["error"]["message"]
    assert replies[1]["id"] == 2 and replies[1]["type"] == "result"


def test_deeply_nested_json_gets_an_error():
    replies = run_raw([b"[" * 100000 + b"]" * 100000, b'{"id": 2, "method": "info"}'], ECHO)
    assert replies[0]["type"] == "error" and replies[1]["type"] == "result"


@pytest.fixture(scope="module")
def engine_process(engine_python):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([engine_python, "-m", "engine", "serve"], cwd=REPO_ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


def _request(proc, line: bytes) -> dict:
    """Send one line and return its final reply (progress and token messages are skipped)."""
    proc.stdin.write(line + b"\n")
    proc.stdin.flush()
    while True:
        reply = json.loads(proc.stdout.readline())
        if reply["type"] in ("result", "error"):
            return reply


def test_real_engine_answers_info_with_device(engine_process):
    reply = _request(engine_process, b'{"id": 1, "method": "info", "params": {"load_model": false}}')
    assert reply["type"] == "result" and reply["result"]["device_type"] in ("cpu", "cuda")
    assert reply["result"]["versions"]["torch"]


def test_real_engine_ask_on_missing_file_is_a_clear_error(engine_process, tmp_path):
    line = json.dumps({"id": 2, "method": "ask",
                       "params": {"raster": str(tmp_path / "nope.tif"), "task": "caption"}}).encode()
    reply = _request(engine_process, line)
    assert reply["type"] == "error" and reply["error"]["code"] == "raster_not_found"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=120).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode()),
    st.builds(lambda i, m, p: json.dumps({"id": i, "method": m, "params": p}).encode(),
              st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
              st.one_of(st.none(), st.integers(), st.sampled_from(["info", "ask", "nope", ""])),
              st.one_of(st.none(), st.integers(), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))),
))
def test_real_engine_survives_random_lines_and_still_answers_info(engine_process, junk):
    if not junk.strip():
        return  # blank lines are skipped by design and get no reply
    reply = _request(engine_process, junk)
    assert reply["type"] in ("error", "result")
    again = _request(engine_process, b'{"id": "alive", "method": "info", "params": {"load_model": false}}')
    assert again["id"] == "alive" and again["type"] == "result"
