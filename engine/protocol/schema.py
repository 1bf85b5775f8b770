"""The request parameters of ``ask`` and ``scan``, validated once, at the edge.

Why one table: the protocol's params, the CLI's flags and their bounds are the same thing said
three times otherwise.  Each :class:`Field` names the param (underscores, as the protocol spells
it), its kind, its bounds and its help; :func:`add_arguments` builds the CLI flags from it
(``--bbox-crs`` for ``bbox_crs``) and :func:`validate` checks a params dict against it, so a
value the CLI accepts is exactly one the server accepts.  Bounds exist so that no input, however
hostile, makes the engine allocate or compute without limit (docs/security.md).

The contract itself (methods, fields, result shape, error codes) is written out in
docs/protocol.md.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from engine.errors import BAD_REQUEST, EngineError
from engine.protocol.wire import clean_text
from engine.tasks import BACKENDS, PRECISIONS, SCAN_TASKS, TASKS, canonical_precision, canonical_task

__all__ = ["Field", "ASK_FIELDS", "SCAN_FIELDS", "RequestParams", "AskParams", "ScanParams", "validate", "add_arguments",
           "params_from_args", "MAX_QUESTION_CHARS", "MAX_WKT_CHARS", "MAX_PATH_CHARS", "MAX_HISTORY_TURNS"]

MAX_QUESTION_CHARS = 4000
MAX_WKT_CHARS = 200_000
MAX_PATH_CHARS = 4096
MAX_CRS_CHARS = 20_000
MAX_HISTORY_TURNS = 6
MAX_NEW_TOKENS = 1024
DEFAULT_MAX_TOKENS = 64
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Field:
    """One request parameter: its kind, bounds, default and help (also the CLI flag's)."""

    name: str
    kind: str                          # text | path | crs | wkt | choice | int | float | bbox | bands | history | flag
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    max_chars: int = MAX_QUESTION_CHARS
    metavar: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _common(task_choices: tuple[str, ...], default_task: str) -> list[Field]:
    return [
        Field("raster", "path", "GeoTIFF / COG / VRT or any GDAL raster", required=True),
        Field("task", "choice", " | ".join(task_choices), default=default_task, choices=task_choices),
        Field("question", "text", "the question (a bare phrase such as 'storage tanks' for ground)"),
        Field("bbox", "bbox", "region XMIN YMIN XMAX YMAX (in --bbox-crs, default the raster's CRS)",
              metavar=("XMIN", "YMIN", "XMAX", "YMAX")),
        Field("bbox_crs", "crs", "CRS of --bbox / --region-wkt (default: the raster's)", max_chars=MAX_CRS_CHARS),
        Field("region_wkt", "wkt", "a polygon region instead of --bbox", max_chars=MAX_WKT_CHARS),
        Field("model", "path", "checkpoint folder (default: the embedded model)"),
        Field("device", "choice", "auto | cpu | cuda", default="auto", choices=DEVICES),
        Field("backend", "choice", "auto | transformers | vllm (LLaVA-family folders on CUDA)", default="auto",
              choices=BACKENDS),
        Field("precision", "choice", "auto: float32 on CPU, bfloat16 on CUDA; int8: int8 decoding on CPU",
              default="auto", choices=PRECISIONS),
        Field("max_tokens", "int", "most tokens an answer may have", default=DEFAULT_MAX_TOKENS, low=1,
              high=MAX_NEW_TOKENS),
        Field("bands", "bands", "1-based bands to use as R G B"),
    ]


ASK_FIELDS: tuple[Field, ...] = tuple(_common(TASKS, "caption") + [
    Field("region_crs", "crs", "CRS of region_wkt (protocol only; the CLI uses --bbox-crs)", max_chars=MAX_CRS_CHARS),
    Field("out", "path", "write results to FILE.gpkg | .shp | .geojson"),
    Field("out_crs", "crs", "CRS of the output polygons (default: the raster's)", max_chars=MAX_CRS_CHARS),
    Field("history", "history", f"earlier {{question, answer}} turns on this region (at most {MAX_HISTORY_TURNS})"),
])
SCAN_FIELDS: tuple[Field, ...] = tuple(_common(SCAN_TASKS, "ground") + [
    Field("out", "path", "the GeoPackage the scan writes (and resumes)", required=True),
    Field("tile", "int", "tile size in raster pixels (default: the model's training ground size)", low=8, high=65536),
    Field("overlap", "int", "overlap between tiles in raster pixels", default=None, low=0, high=65535),
    Field("batch", "int", "tiles per forward pass", default=8, low=1, high=256),
    Field("min_score", "float", "drop detections below this score", default=0.0, low=0.0, high=1.0),
])
_CLI_ONLY_SKIP = {"region_crs", "history"}       # protocol-only params: no CLI flag


def _bad(message: str) -> EngineError:
    return EngineError(BAD_REQUEST, message)


def _check(field: Field, value: Any) -> Any:
    """One param's value, checked against its field (``None`` means absent)."""
    name, kind = field.name, field.kind
    if kind in ("text", "path", "crs", "wkt", "choice"):
        if not isinstance(value, str):
            raise _bad(f"parameter {name!r} must be a string")
        limit = MAX_PATH_CHARS if kind == "path" else field.max_chars
        if len(value) > limit:
            raise _bad(f"parameter {name!r} has {len(value)} characters; at most {limit} are accepted")
        if "\x00" in value:
            raise _bad(f"parameter {name!r} contains a NUL character")
        value = clean_text(value)                 # lone surrogates (from JSON escapes) cannot be encoded
        if value == "" and kind != "text":
            if kind == "wkt":
                raise _bad("parameter 'region_wkt' is empty: give a polygon, or leave it out for the whole view")
            return None
        if kind == "choice":
            return _choice(field, value)
        return value if value.strip() or kind != "text" else None
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"{name} must be an integer between {field.low:g} and {field.high:g}")
        if not field.low <= value <= field.high:
            raise _bad(f"{name} must be an integer between {field.low:g} and {field.high:g}")
        return value
    if kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
            raise _bad(f"{name} must be a number between {field.low:g} and {field.high:g}")
        if not field.low <= value <= field.high:
            raise _bad(f"{name} must be a number between {field.low:g} and {field.high:g}")
        return float(value)
    if kind == "bbox":
        if (not isinstance(value, (list, tuple)) or len(value) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise _bad("bbox must be a list of 4 numbers [xmin, ymin, xmax, ymax]")
        try:
            box = tuple(float(v) for v in value)
        except OverflowError:                     # an integer beyond any float
            box = (math.inf,)
        if not all(math.isfinite(v) for v in box):
            raise _bad("bbox must be 4 finite numbers (no NaN, infinity or numbers beyond a float)")
        return box
    if kind == "bands":
        if (not isinstance(value, list) or not 1 <= len(value) <= 4
                or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 65535 for b in value)):
            raise _bad("bands must be a list of 1 to 4 1-based band numbers")
        return list(value)
    if kind == "history":
        return _history(value)
    raise AssertionError(f"unknown field kind {kind!r}")           # a bug in the table, not in the input


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:                         # an integer beyond any float
        return False


def _choice(field: Field, value: str) -> str:
    if field.name == "task":
        try:
            return canonical_task(value, field.choices)
        except ValueError as exc:
            raise _bad(str(exc)) from None
    if field.name == "precision":
        try:
            canonical_precision(value)
        except ValueError:
            raise _bad(f"unknown precision {value!r}; choose auto, float32, bfloat16, float16 or int8") from None
        return value.lower()
    if value.lower() not in field.choices:
        raise _bad(f"{field.name} must be one of {', '.join(field.choices)}, not {value!r}")
    return value.lower()


def _history(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _bad("history must be a list of {question, answer} turns")
    if len(value) > MAX_HISTORY_TURNS:
        raise _bad(f"history has {len(value)} turns; at most {MAX_HISTORY_TURNS} are kept")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str) \
                or not isinstance(turn.get("answer"), str):
            raise _bad("each history turn must be an object with string 'question' and 'answer'")
        for key in ("question", "answer"):
            if len(turn[key]) > MAX_QUESTION_CHARS:
                raise _bad(f"a history {key} has {len(turn[key])} characters; at most {MAX_QUESTION_CHARS}")
        turns.append({"question": clean_text(turn["question"]), "answer": clean_text(turn["answer"])})
    return turns


def validate(table: tuple[Field, ...], params: Any) -> dict[str, Any]:
    """Checked values of every field (defaults filled in); unknown params are ignored."""
    if not isinstance(params, dict):
        raise _bad("params must be a JSON object")
    out: dict[str, Any] = {}
    for field in table:
        value = params.get(field.name)
        value = None if value is None else _check(field, value)
        if value is None:
            if field.required:
                raise _bad(f"missing parameter {field.name!r}")
            value = field.default
        out[field.name] = value
    if out.get("bbox") is not None and out.get("region_wkt") is not None:
        raise _bad("give either bbox or region_wkt, not both")
    if out.get("task") == "vqa" and not out.get("question"):
        raise _bad("the vqa task needs a question")
    return out


@dataclass
class RequestParams:
    """What every request on a raster shares: the validated values of its table's fields."""

    raster: str
    task: str
    question: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    region_wkt: str | None = None
    model: str | None = None
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    max_tokens: int = DEFAULT_MAX_TOKENS
    bands: list[int] | None = None

    TABLE: ClassVar[tuple[Field, ...]] = ()

    @classmethod
    def from_dict(cls, params: Any):
        values = validate(cls.TABLE, params)
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass
class AskParams(RequestParams):
    """Validated ``ask`` parameters; mirrors the CLI flags (docs/protocol.md)."""

    region_crs: str | None = None
    out: str | None = None
    out_crs: str | None = None
    history: list[dict] | None = None

    TABLE: ClassVar[tuple[Field, ...]] = ASK_FIELDS

    def __post_init__(self) -> None:
        self.region_crs = self.region_crs or self.bbox_crs


@dataclass
class ScanParams(RequestParams):
    """Validated ``scan`` parameters; mirrors the CLI flags (docs/protocol.md)."""

    out: str = ""                                  # required by the table
    tile: int | None = None
    overlap: int | None = None
    batch: int = 8
    min_score: float = 0.0

    TABLE: ClassVar[tuple[Field, ...]] = SCAN_FIELDS


def add_arguments(parser: argparse.ArgumentParser, table: tuple[Field, ...]) -> None:
    """The CLI flags of a table: ``--bbox-crs`` for ``bbox_crs``, types and choices from the field."""
    for field in table:
        if field.name in _CLI_ONLY_SKIP:
            continue
        kwargs: dict[str, Any] = {"help": field.help, "dest": field.name}
        if field.kind == "bbox":
            kwargs.update(nargs=4, type=float, metavar=field.metavar)
        elif field.kind == "bands":
            kwargs.update(nargs="+", type=int)
        elif field.kind == "int":
            kwargs.update(type=int)
        elif field.kind == "float":
            kwargs.update(type=float)
        if field.default is not None and field.name not in ("task",):
            kwargs["default"] = field.default
        if field.name in ("device", "backend"):
            kwargs["choices"] = field.choices
        if field.required:
            kwargs["required"] = True
        parser.add_argument(field.flag, **kwargs)


def params_from_args(args: argparse.Namespace, table: tuple[Field, ...]) -> dict[str, Any]:
    """The params dict the CLI's flags stand for (absent flags left out); validated by the handler."""
    params = {f.name: getattr(args, f.name, None) for f in table if f.name not in _CLI_ONLY_SKIP}
    if "region_crs" in {f.name for f in table} and params.get("bbox_crs"):
        params["region_crs"] = params["bbox_crs"]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if v is not None}
