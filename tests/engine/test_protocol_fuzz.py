"""The standing fuzz suite: hypothesis draws hostile requests (every field with every JSON type,
unicode edge cases, sizes) and a live ``python -m engine serve`` must answer each one with exactly
one strict-JSON final reply, stay alive and keep its worker answering.  The long run with the
figures is ``make fuzz`` (scripts/fuzz_protocol.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from fuzz_protocol import FINAL_TYPES, LiveServer  # noqa: E402

FIELDS = ["raster", "task", "question", "bbox", "bbox_crs", "region_wkt", "region_crs", "out", "out_crs", "model",
          "device", "precision", "max_tokens", "bands", "history", "target", "load_model", "tile", "overlap",
          "batch", "min_score"]
METHODS = ["info", "ask", "scan", "cancel", "ping", "nope", "", "ASK"]

# Unicode edge cases: lone surrogates, NUL, BOM, bidi controls, combining marks, astral planes.
EDGE_TEXT = st.sampled_from(["", "\u0000", "\ud800", "\udfff", "\ufeff", "\u202e", "e\u0301", "\U0001f600",
                             "\u2028", "/dev/stdin", "http://127.0.0.1:9/a.tif", "+proj=longlat +nadgrids=/etc/passwd",
                             "POLYGON ((0 0, inf 0, 1 1, 0 0))", "x" * 5000, "q" * 60_000])
TEXT = st.one_of(st.text(max_size=30), st.text(st.characters(codec="utf-16", exclude_categories=()), max_size=10),
                 EDGE_TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 63, max_value=2 ** 80),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
PARAMS = st.one_of(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), JSON)
REQUEST = st.fixed_dictionaries({"method": st.one_of(st.sampled_from(METHODS), JSON), "params": PARAMS},
                                optional={"id": JSON})
NON_STRICT_LINES = [b'{"id": 1, "method": "ping", "params": {"x": NaN}}', b'{"id": Infinity, "method": "ping"}',
                    b'{"id": 1e999, "method": "ping"}', b"[" * 20000 + b"]" * 20000, b'{"id": "\\ud800", "method": "ping"}',
                    b'{"id": ' + b"9" * 5000 + b', "method": "ping"}', b"\xff\xfe{}", b"\x00", b"{,}"]


def encode(request: dict) -> bytes:
    """One request line as a client might write it (lone surrogates escaped, as json.dumps does)."""
    return json.dumps(request, ensure_ascii=True).encode("ascii")


def sentinel_ask(n: int, tmp: Path) -> tuple[str, bytes]:
    """A queued request answered only after everything sent before it: proves the worker lives."""
    sid = f"sentinel-{n}"
    return sid, encode({"id": sid, "method": "ask", "params": {"raster": str(tmp / "missing.tif")}})


@pytest.fixture(scope="module")
def live(engine_python, tmp_path_factory):
    server = LiveServer(python=engine_python)
    server.scratch = tmp_path_factory.mktemp("fuzz")
    server.count = 0
    yield server
    server.close()


def exchange(live: LiveServer, line: bytes) -> list[dict]:
    """Send one line and a sentinel; the strict replies that came before the sentinel's."""
    live.count += 1
    sid, sentinel = sentinel_ask(live.count, live.scratch)
    replies: list[dict | None] = []
    assert live.send(line) and live.send(sentinel), "the server's input is closed: it died"
    assert live.collect_until(sid, 120, lambda raw, reply: replies.append(reply)), "no sentinel reply: dead or wedged"
    assert None not in replies, "a reply was not strict JSON of the reply shape"
    return [r for r in replies[:-1] if r["type"] in FINAL_TYPES]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=REQUEST)
def test_every_hostile_request_gets_exactly_one_strict_final_reply(live, request):
    if request.get("method") == "shutdown":
        return  # ends the server by design
    finals = exchange(live, encode(request))
    assert len(finals) == 1
    assert live.alive()


@pytest.mark.parametrize("line", NON_STRICT_LINES)
def test_non_strict_json_gets_one_error(live, line):
    finals = exchange(live, line)
    assert len(finals) == 1 and finals[0]["type"] == "error"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.binary(min_size=1, max_size=200).map(lambda b: b.replace(b"\n", b" ")))
def test_random_bytes_get_one_final_reply_each(live, line):
    finals = exchange(live, line)
    assert len(finals) == (1 if line.strip() else 0)


def test_an_over_long_line_is_refused_and_the_server_goes_on(live):
    finals = exchange(live, b'{"id": 1, "method": "ask", "params": {"question": "' + b"x" * (9 * 1024 * 1024) + b'"}}')
    assert [r["id"] for r in finals] == [None] and finals[0]["error"]["code"] == "bad_request"


def test_after_the_fuzzing_info_still_answers(live):
    finals = exchange(live, b'{"id": "i", "method": "info", "params": {"load_model": false}}')
    assert finals[0]["id"] == "i" and finals[0]["type"] == "result"
