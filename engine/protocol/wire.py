"""The protocol's wire format: strict JSON lines in, strict JSON lines out, neither side can throw.

Why a module of its own: a reply that cannot be encoded used to kill the server (a lone
surrogate echoed in an id, a NaN in a result) or, worse, the worker thread inside its own error
branch.  Here every outgoing message is first made plain (:func:`plain`): only dicts with string
keys, lists, strings, finite floats, ints, bools and null survive, so :func:`encode` cannot fail
and its output is strict RFC 8259 JSON that any client parses:

* NaN and +-Infinity become ``null`` (``json.dumps`` would write the non-standard ``NaN``);
* lone surrogates (``"\\ud800"``, which Python strings can hold but UTF-8 cannot) become U+FFFD;
* numpy scalars and arrays become numbers and lists, tuples and sets lists, anything else its
  ``str()`` (or a placeholder when even that fails); nesting deeper than :data:`MAX_DEPTH` is cut;
* the line is pure ASCII (``ensure_ascii``), so no stdout encoding can refuse it.

Incoming lines are parsed as strictly (:func:`decode`): ``NaN``, ``Infinity`` and numbers that
overflow to infinity are refused, as are lines longer than :data:`MAX_LINE_BYTES`
(:func:`bounded_lines` discards the rest of such a line without holding it in memory).
"""
from __future__ import annotations

import io
import json
import math
import re
from typing import IO, Any, Iterable, Iterator

__all__ = ["MAX_LINE_BYTES", "MAX_DEPTH", "WireError", "plain", "encode", "decode",
           "bounded_lines", "is_valid_id", "MAX_ID_CHARS"]

MAX_LINE_BYTES = 8 * 1024 * 1024
"""Longest request line read (8 MiB: far above the largest valid ask, a 200 k-character WKT)."""

MAX_DEPTH = 64
"""Deepest nesting kept in a reply; deeper parts become a placeholder string."""

MAX_ID_CHARS = 256
"""Longest string id accepted (ids are echoed in every reply of a request)."""

_ID_INT_LIMIT = 2 ** 63
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOO_DEEP = "<nested too deeply>"
_UNPRINTABLE = "<unprintable>"


class WireError(ValueError):
    """A request line that is not strict JSON (the message says why, for the error reply)."""


# --------------------------------------------------------------------------- outgoing


def clean_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD, so it encodes to UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON data (see the module docstring); never raises."""
    try:
        return _plain(value, depth)
    except Exception:  # noqa: BLE001 - the encoder must not throw, whatever it is given
        return _UNPRINTABLE


def _plain(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value)
    if depth >= MAX_DEPTH:
        return _TOO_DEEP
    if isinstance(value, dict):
        return {_key(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return plain(value.tolist(), depth + 1)
    return _text(value)


def _key(key: Any) -> str:
    return clean_text(key) if isinstance(key, str) else _text(key)


def _text(value: Any) -> str:
    try:
        return clean_text(str(value))
    except Exception:  # noqa: BLE001 - a __str__ that raises
        return _UNPRINTABLE


def encode(message: Any) -> str:
    """One strict-JSON, pure-ASCII line (without the newline) for ``message``; never raises."""
    try:
        return json.dumps(plain(message), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except Exception:  # noqa: BLE001 - cannot happen for plain data; keep the promise anyway
        return json.dumps({"id": None, "type": "error",
                           "error": {"code": "internal", "message": "a reply could not be encoded"}})


# --------------------------------------------------------------------------- incoming


def _refuse_constant(name: str) -> Any:
    raise WireError(f"{name} is not strict JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"number {text[:40]} does not fit a double")
    return value


def decode(raw: bytes) -> Any:
    """Parse one request line as strict JSON; raises :class:`WireError` saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("request line is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except WireError:
        raise
    except RecursionError:
        raise WireError("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python converts
        raise WireError(f"malformed JSON: {exc}") from None


def is_valid_id(value: Any) -> bool:
    """Ids are strings (at most :data:`MAX_ID_CHARS`, no lone surrogates, since an id must come
    back unchanged) or 64-bit integers; bools and floats are not ids."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_ID_INT_LIMIT <= value < _ID_INT_LIMIT
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS and not _SURROGATE.search(value)


def bounded_lines(stream: IO[bytes] | Iterable[bytes],
                  limit: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The stream's lines; ``None`` in place of a line longer than ``limit`` bytes.

    A buffered stream is read with ``readline(limit)``, so an endless line costs at most
    ``limit`` bytes of memory; any other iterable of lines is passed through with the same check.
    """
    if isinstance(stream, io.BufferedIOBase):
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while True:  # skip to the end of the over-long line
                    rest = stream.readline(limit)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield None
                continue
            yield line
    else:
        for line in stream:
            yield None if len(line) > limit + 1 else line
