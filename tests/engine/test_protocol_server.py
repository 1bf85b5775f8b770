"""The JSON-lines server: every line gets an answer, bad lines never stop it (DESIGN.md contract)."""
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
