"""A stand-in engine package for dock tests that need exact answers: ``python -m engine serve``
in a temporary folder, speaking the real JSON-lines protocol over a real subprocess.

It answers every ``ask`` with boxes at fixed pixel positions of the asked bbox, streams the
answer as tokens, and appends each request's params to ``requests.jsonl`` beside it, so a test
can read what the plugin sent (the ``history`` of a follow-up, for instance).  What it answers
is chosen by the question:

* contains "old engine": ``text`` still carries raw box syntax and there is no ``raw`` field
  (the engine before it made ``text`` readable);
* contains "warn": the result carries two ``warnings``;
* anything else: readable ``text`` ("2 airplanes"), ``raw`` with the box syntax.
"""
from __future__ import annotations

from pathlib import Path

SERVER = r'''
import json, sys
from pathlib import Path

LOG = Path(__file__).resolve().parent.parent / "requests.jsonl"


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def box(x0, y0, x1, y1):
    return f"POLYGON (({x0} {y0}, {x1} {y0}, {x1} {y1}, {x0} {y1}, {x0} {y0}))"


def answer(params):
    question = params.get("question") or ""
    xmin, ymin, xmax, ymax = params.get("bbox") or [0, 0, 100, 100]
    w, h = xmax - xmin, ymax - ymin
    boxes = [{"label": "airplane", "score": 0.9, "bbox_pixel": [1, 1, 5, 5],
              "wkt": box(xmin + 0.1 * w, ymin + 0.1 * h, xmin + 0.3 * w, ymin + 0.3 * h)},
             {"label": "airplane", "score": 0.4, "bbox_pixel": [6, 6, 9, 9],
              "wkt": box(xmin + 0.6 * w, ymin + 0.6 * h, xmin + 0.8 * w, ymin + 0.8 * h)}]
    raw = "airplane {<29><18><45><31>|0}{<60><60><80><80>|0}"
    result = {"task": params.get("task"), "question": question or "Describe the image.",
              "boxes": boxes, "crs": params.get("bbox_crs") or "EPSG:32633",
              "extent": {"wkt": box(xmin, ymin, xmax, ymax), "bounds": [xmin, ymin, xmax, ymax]},
              "retrieved": [{"level": "object", "entry": "airplane", "id": "object.airplane",
                             "kind": "object_class", "definition": "A fixed-wing aircraft.",
                             "score": 0.8}],
              "timing": {"total_s": 0.01}, "model": "fake-engine", "warnings": []}
    if "old engine" in question:
        result["text"] = raw
    else:
        result["text"], result["raw"] = "2 airplanes", raw
    if "warn" in question:
        result["warnings"] = ["region extends beyond the raster; clipped to 200 x 200 px",
                              "region is only 3x2 source pixels, far below the model's scale"]
    return result


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        send({"id": None, "type": "error", "error": {"code": "bad_request", "message": "json"}})
        continue
    rid, method, params = msg.get("id"), msg.get("method"), msg.get("params") or {}
    with LOG.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"method": method, "params": params}) + "\n")
    if method == "info":
        send({"id": rid, "type": "result", "result": {"device": "cpu", "device_type": "cpu",
                                                      "model": {"name": "fake-engine"}}})
    elif method == "ask":
        result = answer(params)
        raw = result.get("raw") or result["text"]
        for piece in (raw[:9], raw[9:20], raw[20:]):
            send({"id": rid, "type": "token", "text": piece})
        send({"id": rid, "type": "result", "result": result})
    elif method == "shutdown":
        send({"id": rid, "type": "result", "result": {}})
        break
    elif method == "cancel":
        send({"id": rid, "type": "result", "result": {"cancelled": False}})
    else:
        send({"id": rid, "type": "error", "error": {"code": "unknown_method", "message": method}})
'''


def write_fake_engine(root: Path) -> Path:
    """Create ``root/engine`` (a package whose ``__main__`` is the server above)."""
    package = root / "engine"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(SERVER)
    return root


def sent_requests(root: Path, method: str = "ask") -> list:
    """The params of every request of ``method`` the fake engine received, in order."""
    import json

    log = root / "requests.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [row["params"] for row in rows if row["method"] == method]
