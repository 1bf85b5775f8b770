"""Hostile lines against a live ``python -m engine serve``: counts deaths, wedges and non-strict replies.

Why: the protocol server must survive whatever a buggy or hostile client writes (docs/security.md).
This sends N lines (``make fuzz``: 10,000) drawn from every kind of hostility the server meets:
bytes that are not UTF-8, JSON of every type at the top level, non-strict JSON (NaN, Infinity,
1e999, deep nesting), requests whose id, method and params hold every JSON type, and ``ask`` /
``scan`` / ``cancel`` / ``info`` params whose every field holds every JSON type, unicode edge
cases (lone surrogates, NUL, BOM, right-to-left marks), hostile paths (``/dev/stdin``, FIFOs,
URLs, over-long paths), hostile CRSs (``+nadgrids=/etc/passwd``, PROJ pipelines) and sizes up
to over-long lines.  ``shutdown`` is the one method left out, since it ends the server by design.

After every batch a sentinel ``ask`` (queued behind every earlier request) must be answered
within the wedge timeout, so a stuck worker is seen, not only a dead process.  Every reply is
parsed as strict JSON (no NaN / Infinity) and checked for the reply shape; every non-blank line
must get exactly one final reply.  At the end ``info`` and a real ``ask`` on the sample raster
must still answer.  Prints one JSON summary; exit status 1 when anything failed.

    python scripts/fuzz_protocol.py --lines 10000 [--seed 0] [--batch 25]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RASTER = REPO_ROOT / "resources" / "sample" / "sample_utm33n.tif"
REPLY_TYPES = ("progress", "token", "result", "error")
FINAL_TYPES = ("result", "error")


# --------------------------------------------------------------------------- the live server


def refuse_constant(name: str) -> Any:
    raise ValueError(f"non-strict JSON constant {name}")


def strict_reply(line: bytes) -> dict | None:
    """The reply as a dict when it is strict JSON of the reply shape, else None."""
    try:
        reply = json.loads(line.decode("utf-8"), parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(reply, dict) or "id" not in reply or reply.get("type") not in REPLY_TYPES:
        return None
    if reply["type"] == "error":
        err = reply.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
            return None
    return reply


class LiveServer:
    """A ``python -m engine serve`` subprocess with a reader thread, so writes never block on replies."""

    def __init__(self, python: str = sys.executable, stderr_path: Path | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("RS_LVLM_ALLOW_NETWORK", None)
        self._stderr = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([python, "-m", "engine", "serve"], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.replies: "queue.Queue[bytes | None]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, line: bytes) -> bool:
        """Write one line (a newline is added); False when the server's stdin is gone."""
        try:
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def collect_until(self, request_id: Any, timeout_s: float, on_reply: Callable[[bytes, dict | None], None]) -> bool:
        """Pass every reply to ``on_reply`` until ``request_id``'s final reply; False on a timeout or EOF."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            reply = strict_reply(line)
            on_reply(line, reply)
            if reply is not None and reply.get("id") == request_id and reply["type"] in FINAL_TYPES:
                return True

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()


# --------------------------------------------------------------------------- hostile lines


class Hostile:
    """Draws hostile lines from a seeded generator (the same seed gives the same lines)."""

    def __init__(self, seed: int, scratch: Path) -> None:
        self.rng = random.Random(seed)
        fifo = scratch / "fifo.tif"
        if hasattr(os, "mkfifo") and not fifo.exists():
            os.mkfifo(fifo)
        self.paths = ["/dev/stdin", "/dev/zero", "/dev/null", "/vsistdin/", str(fifo), "http://127.0.0.1:9/a.tif",
                      "/vsicurl/http://127.0.0.1:9/a.tif", "/etc/passwd", "/", "~", ".", "..", "x" * 5000,
                      "a\u0000b", "/proc/self/mem", str(scratch / "nope.tif"), "NETCDF:\"a.nc\":v", "vrt://a.tif",
                      "C:\\\\Windows\\\\x.tif", "\\\\\\\\server\\\\share\\\\a.tif", str(scratch)]
        self.crss = ["EPSG:4326", "EPSG:0", "EPSG:" + "9" * 30, "+proj=longlat +nadgrids=/etc/passwd",
                     "+proj=longlat +datum=WGS84 +nadgrids=http://127.0.0.1:9/g.tif", "+proj=pipeline +step +proj=axisswap",
                     "GEOGCS[", "x" * 30000, "+init=/etc/passwd:1", "EPSG:5773", ""]
        self.wkts = ["", "POLYGON ((0 0, 1", "POLYGON ((0 0, inf 0, 1 1, 0 0))", "POINT (1 2)", "GEOMETRYCOLLECTION EMPTY",
                     "POLYGON ((0 0, 10 10, 10 0, 0 10, 0 0))", "POLYGON ((1e308 1e308, -1e308 1e308, 0 -1e308, 1e308 1e308))",
                     "MULTIPOLYGON (" + "((0 0, 1 0, 1 1, 0 0))," * 2000 + "((0 0, 1 0, 1 1, 0 0)))"]
        self.texts = ["", " ", "\u0000", "\ud800", "\udfff", "a\ud83d", "\ufeff", "\u202e\u202d", "e\u0301" * 50,
                      "\U0001f600" * 100, "\n", "\r\n", "\\", '"', "%s%n", "{{}}", "<script>", "x" * 5001,
                      "q" * 100_000, "[grounding] {<1><2><3><4>|0}", "\u2028\u2029"]
        self.fields = ["raster", "task", "question", "bbox", "bbox_crs", "region_wkt", "region_crs", "out", "out_crs",
                       "model", "device", "precision", "max_tokens", "bands", "history", "target", "id",
                       "load_model", "tile", "overlap", "batch", "min_score", "stretch", ""]
        self.methods = ["info", "ask", "scan", "cancel", "ping", "nope", "", "ASK", "info ", "__init__", "shutdown\u0000"]

    # -- values of every JSON type ----------------------------------------------------------
    def number(self) -> Any:
        return self.rng.choice([0, -1, 1, 2 ** 63, -(2 ** 63) - 1, 10 ** 400, 1.0, -0.0, 0.5, 1e308, 5e-324,
                                self.rng.randint(-10 ** 6, 10 ** 6), self.rng.random() * 1e6, True, False])

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(self.texts)
        if r < 0.6:
            return self.rng.choice(self.paths + self.crss + self.wkts)
        return "".join(chr(self.rng.choice([self.rng.randint(0, 0x7f), self.rng.randint(0x80, 0xffff),
                                            self.rng.randint(0x10000, 0x10ffff)])) for _ in range(self.rng.randint(0, 40)))

    def value(self, depth: int = 0) -> Any:
        kind = self.rng.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return None
        if kind == 1:
            return self.number()
        if kind in (2, 3):
            return self.text()
        if kind == 4:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        if kind == 5:
            return {self.text()[:20]: self.value(depth + 1) for _ in range(self.rng.randint(0, 4))}
        return self.field_value(self.rng.choice(self.fields), depth + 1)

    def field_value(self, name: str, depth: int = 0) -> Any:
        """A value that is plausible for ``name`` about half of the time, anything otherwise."""
        if self.rng.random() < 0.5 and depth < 6:
            return self.value(depth + 1)
        plausible = {
            "raster": lambda: self.rng.choice(self.paths),
            "bbox": lambda: [self.number() for _ in range(self.rng.choice([3, 4, 4, 4, 5]))],
            "bbox_crs": lambda: self.rng.choice(self.crss), "region_crs": lambda: self.rng.choice(self.crss),
            "out_crs": lambda: self.rng.choice(self.crss), "region_wkt": lambda: self.rng.choice(self.wkts),
            "task": lambda: self.rng.choice(["caption", "vqa", "ground", "classify", "", "CAPTION", "detect"]),
            "max_tokens": lambda: self.rng.choice([0, 1, 1024, 1025, -1, 10 ** 12, 1.5, "8", True]),
            "history": lambda: [{"question": self.text(), "answer": self.text()} for _ in range(self.rng.randint(0, 12))],
            "bands": lambda: [self.number() for _ in range(self.rng.randint(0, 5))],
            "out": lambda: str(Path(tempfile.gettempdir()) / "rs_lvlm_fuzz_out" / self.rng.choice(["a.gpkg", "a.txt", "a.shp"])),
        }
        return plausible.get(name, self.text)()

    # -- lines -----------------------------------------------------------------------------
    def request(self) -> Any:
        method = self.rng.choice(self.methods)
        params: Any = {name: self.field_value(name) for name in self.rng.sample(self.fields, self.rng.randint(0, 8))}
        if self.rng.random() < 0.1:
            params = self.value()
        request: dict[str, Any] = {"method": method, "params": params}
        if self.rng.random() < 0.9:
            request["id"] = self.value() if self.rng.random() < 0.5 else self.rng.randint(0, 10 ** 6)
        if self.rng.random() < 0.1:
            request[self.text()[:10]] = self.value()
        if self.rng.random() < 0.05:
            request["method"] = self.value()
        return request

    def plausible_ask(self) -> dict:
        """A well-formed ask or scan with one to three hostile fields: it gets past the parser."""
        raster = str(SAMPLE_RASTER) if self.rng.random() < 0.3 else self.rng.choice(self.paths)
        params: dict[str, Any] = {"raster": raster, "task": self.rng.choice(["caption", "vqa", "ground", "classify"]),
                                  "question": "what is here?", "max_tokens": self.rng.randint(1, 4)}
        for name in self.rng.sample(self.fields[1:15], self.rng.randint(1, 3)):
            params[name] = self.field_value(name)
        if isinstance(params.get("max_tokens"), int) and params["max_tokens"] > 4:
            params["max_tokens"] = 4             # keep the few answers that run short
        method = "scan" if self.rng.random() < 0.1 else "ask"
        return {"id": f"p{self.rng.randrange(10 ** 9)}", "method": method, "params": params}

    def line(self) -> bytes:
        r = self.rng.random()
        if r < 0.25:
            return json.dumps(self.plausible_ask(), ensure_ascii=True).replace("\n", " ").encode()
        if r < 0.31:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 120))).replace(b"\n", b" ")
        if r < 0.35:
            return json.dumps(self.value()).encode()
        if r < 0.41:
            return self.rng.choice([b'{"id": 1, "method": "info", "params": {"x": NaN}}', b'{"id": Infinity, "method": "ping"}',
                                    b'{"id": 1e999, "method": "ping"}', b"[" * 50000 + b"]" * 50000,
                                    b'{"id": 1, "id": 2, "method": "ping"}', b'{"id": 1, "method": "ping",}',
                                    b'{"id": ' + b"9" * 5000 + b', "method": "ping"}', b'{"id": "\\ud800", "method": "ping"}',
                                    b'{"id": "c", "method": "cancel", "params": {"target": [9]}}', b"\xef\xbb\xbf{}",
                                    b'{"method": "ask", "params": {"raster": "/dev/stdin"}}', b" \t ", b"null", b"\x00"])
        text = json.dumps(self.request(), ensure_ascii=self.rng.random() < 0.5, allow_nan=True)
        return text.encode("utf-8", "surrogatepass").replace(b"\n", b" ")

    def long_line(self) -> bytes:
        return b'{"id": "long", "method": "ask", "params": {"question": "' + b"x" * (9 * 1024 * 1024) + b'"}}'


# --------------------------------------------------------------------------- the run


def run(lines: int, seed: int, batch: int, wedge_timeout_s: float, real_ask: bool, log_path: Path | None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="rs_lvlm_fuzz_"))
    hostile = Hostile(seed, scratch)
    stats = {"lines_sent": 0, "replies": 0, "deaths": 0, "wedges": 0, "non_strict_replies": 0, "unanswered_lines": 0,
             "extra_final_replies": 0, "internal_errors": 0, "codes": {}, "examples": [],
             "internal_examples": []}
    server = LiveServer(stderr_path=log_path)
    t0 = time.monotonic()
    sentinel = 0

    def on_reply(line: bytes, reply: dict | None) -> None:
        stats["replies"] += 1
        if reply is None:
            stats["non_strict_replies"] += 1
            if len(stats["examples"]) < 10:
                stats["examples"].append(line[:300].decode("utf-8", "replace"))
            return
        if reply["type"] in FINAL_TYPES:
            finals[0] += 1
            if reply["type"] == "error":
                code = reply["error"]["code"]
                stats["codes"][code] = stats["codes"].get(code, 0) + 1
                stats["internal_errors"] += code == "internal"
                if code == "internal" and len(stats["internal_examples"]) < 10:
                    stats["internal_examples"].append(reply["error"]["message"][:200])

    while stats["lines_sent"] < lines:
        finals = [0]
        expected = 0
        for _ in range(min(batch, lines - stats["lines_sent"])):
            line = hostile.long_line() if stats["lines_sent"] in (lines // 3, 2 * lines // 3) else hostile.line()
            stats["lines_sent"] += 1
            expected += bool(line.strip())
            if not server.send(line):
                break
        sentinel += 1
        sid = f"fuzz-sentinel-{sentinel}"
        server.send(json.dumps({"id": sid, "method": "ask", "params": {"raster": str(scratch / "none.tif")}}).encode())
        answered = server.collect_until(sid, wedge_timeout_s, on_reply)
        if not answered or not server.alive():
            if not server.alive():
                stats["deaths"] += 1
            else:
                stats["wedges"] += 1
            server.close()
            server = LiveServer(stderr_path=log_path)
            continue
        finals[0] -= 1                         # the sentinel's own reply
        stats["unanswered_lines"] += max(0, expected - finals[0])
        stats["extra_final_replies"] += max(0, finals[0] - expected)
    stats["fuzz_s"] = round(time.monotonic() - t0, 1)
    stats.update(final_checks(server, real_ask, wedge_timeout_s))
    server.close()
    return stats


def final_checks(server: LiveServer, real_ask: bool, timeout_s: float) -> dict:
    """``info`` and (when a model and the sample raster exist) a real ask must still answer."""
    got: dict[str, dict | None] = {}

    def keep(line: bytes, reply: dict | None) -> None:
        if reply is not None and reply["type"] in FINAL_TYPES:
            got[str(reply.get("id"))] = reply

    server.send(b'{"id": "final-info", "method": "info", "params": {}}')
    server.collect_until("final-info", max(timeout_s, 300), keep)
    info = got.get("final-info")
    out = {"info_ok": bool(info and info["type"] == "result")}
    if real_ask and SAMPLE_RASTER.is_file():
        ask = {"id": "final-ask", "method": "ask", "params": {"raster": str(SAMPLE_RASTER), "task": "caption",
                                                               "max_tokens": 24}}
        server.send(json.dumps(ask).encode())
        server.collect_until("final-ask", max(timeout_s, 300), keep)
        reply = got.get("final-ask")
        out["ask_ok"] = bool(reply and reply["type"] == "result" and reply["result"].get("text") is not None)
        out["ask_text"] = (reply or {}).get("result", {}).get("text") if out["ask_ok"] else reply
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=25, help="hostile lines between two sentinel asks")
    parser.add_argument("--wedge-timeout", type=float, default=60.0, help="seconds a sentinel may take")
    parser.add_argument("--no-real-ask", action="store_true", help="skip the final ask on the sample raster")
    parser.add_argument("--log", type=Path, help="append the server's stderr here")
    args = parser.parse_args(argv)
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
    stats = run(args.lines, args.seed, args.batch, args.wedge_timeout, not args.no_real_ask, args.log)
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    failed = (stats["deaths"] or stats["wedges"] or stats["non_strict_replies"] or stats["unanswered_lines"]
              or not stats["info_ok"] or stats.get("ask_ok") is False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
