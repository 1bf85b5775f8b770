"""The engine's request handlers: ``info`` and ``ask``, shared by the server and the CLI.

One ``EngineService`` lives as long as the engine process and keeps the model loaded between
requests (loading is the slow part; answering is fast). Bad input is checked before the model
is touched, so an analyst with a wrong region hears about it at once, even with no model.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .errors import BAD_REQUEST, NO_MODEL, EngineError
from .paths import DEFAULT_MODEL_DIR

log = logging.getLogger("engine.service")

TASKS = ("caption", "vqa", "ground", "classify")
PRECISIONS = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
              "float16": "float16", "fp16": "float16", "int8": "int8"}
TASK_ALIASES = {"ask": "vqa", "question": "vqa", "grounding": "ground", "detect": "ground", "classification": "classify"}
DEFAULT_IMAGE_SIZE = 128
DEFAULT_MAX_TOKENS = 64


class Context(Protocol):
    """What a handler may report back while it works (the server's RequestContext fits)."""

    def progress(self, done: int, total: int, message: str = "") -> None: ...
    def token(self, text: str) -> None: ...
    def should_stop(self) -> bool: ...
    def check_cancelled(self) -> None: ...


class SilentContext:
    """Context for the one-shot CLI: progress to the log, tokens ignored, never cancelled."""

    def progress(self, done: int, total: int, message: str = "") -> None:
        log.info("[%d/%d] %s", done, total, message)

    def token(self, text: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        pass


@dataclass
class AskParams:
    """Validated ``ask`` parameters; mirrors the CLI flags (see DESIGN.md's contract)."""

    raster: str
    task: str
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    region_wkt: str | None = None
    region_crs: str | None = None
    question: str | None = None
    out: str | None = None
    out_crs: str | None = None
    model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_tokens: int = DEFAULT_MAX_TOKENS
    bands: list[int] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "AskParams":
        def text(name: str, required: bool = False) -> str | None:
            value = params.get(name)
            if value is None or value == "":
                if required:
                    raise EngineError(BAD_REQUEST, f"missing parameter {name!r}")
                return None
            if not isinstance(value, str):
                raise EngineError(BAD_REQUEST, f"parameter {name!r} must be a string")
            return value

        raster = text("raster", required=True)
        task = (text("task") or "caption").lower()
        task = TASK_ALIASES.get(task, task)
        if task not in TASKS:
            raise EngineError(BAD_REQUEST, f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        bbox = params.get("bbox")
        if bbox is not None:
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                raise EngineError(BAD_REQUEST, "bbox must be a list of 4 numbers [xmin, ymin, xmax, ymax]")
            bbox = tuple(float(v) for v in bbox)
        region_wkt = text("region_wkt")
        if bbox is not None and region_wkt is not None:
            raise EngineError(BAD_REQUEST, "give either bbox or region_wkt, not both")
        question = text("question")
        if task == "vqa" and not (question and question.strip()):
            raise EngineError(BAD_REQUEST, "the vqa task needs a question")
        max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
            raise EngineError(BAD_REQUEST, "max_tokens must be an integer between 1 and 4096")
        bands = params.get("bands")
        if bands is not None and (not isinstance(bands, list) or not all(isinstance(b, int) for b in bands)):
            raise EngineError(BAD_REQUEST, "bands must be a list of 1-based band numbers")
        device = text("device") or "auto"
        precision = (text("precision") or "auto").lower()
        if precision not in PRECISIONS:
            raise EngineError(BAD_REQUEST, f"unknown precision {precision!r}; choose auto, float32, bfloat16, float16 or int8")
        return cls(precision=precision, raster=raster, task=task, bbox=bbox, bbox_crs=text("bbox_crs"), region_wkt=region_wkt,
                   region_crs=text("region_crs") or text("bbox_crs"), question=question, out=text("out"),
                   out_crs=text("out_crs"), model=text("model"), device=device, max_tokens=max_tokens, bands=bands)


def model_image_size(model_dir: Path) -> int:
    """The model's input size from config.json, read without loading torch (cheap validation)."""
    config_path = model_dir / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            size = config.get("image_size") or (config.get("vision_config") or {}).get("image_size")
            return int(size or DEFAULT_IMAGE_SIZE)
        except (ValueError, OSError):
            return DEFAULT_IMAGE_SIZE
    return DEFAULT_IMAGE_SIZE


def require_model_dir(model_dir: Path) -> None:
    """Fail with the message an analyst needs when there is no checkpoint yet."""
    if not (model_dir / "config.json").is_file():
        raise EngineError(
            NO_MODEL,
            f"no model checkpoint at {model_dir} (config.json missing). Train the embedded model with "
            f"'make model' (python -m engine train) or pass --model DIR pointing at a checkpoint folder.")


class EngineService:
    """Keeps one model loaded per (folder, device) and answers ``info`` and ``ask``."""

    def __init__(self, default_model: str | Path | None = None, default_device: str = "auto") -> None:
        self.default_model = Path(default_model) if default_model else DEFAULT_MODEL_DIR
        self.default_device = default_device
        self._pipeline: Any = None
        self._pipeline_key: tuple | None = None
        self.started = time.time()

    # -- model ------------------------------------------------------------------------------
    def pipeline(self, model: str | None, device: str | None, precision: str = "auto") -> Any:
        """Load (once) and return the inference pipeline for a model folder, device and precision.

        ``auto`` is float32 on the CPU and bfloat16 on CUDA; half precision on a CPU is allowed
        but slow, since few CPU kernels are vectorised for it.  ``int8`` (CPU, embedded model
        family) keeps float32 weights for the prefill and decodes with int8 matrices.
        """
        from .device import resolve_device

        model_dir = Path(model) if model else self.default_model
        require_model_dir(model_dir)
        resolved = resolve_device(device or self.default_device)
        dtype = PRECISIONS.get(precision or "auto")
        int8 = dtype == "int8"
        if int8:
            # Checked before loading anything: a refused request keeps the loaded model.
            from .backends import backend_for

            if resolved != "cpu":
                raise EngineError(BAD_REQUEST, "int8 precision is for the CPU; use bfloat16 or float16 on CUDA")
            if backend_for(model_dir) != "rs_lvlm":
                raise EngineError(BAD_REQUEST, "int8 precision is available for the embedded model family only")
            dtype = "float32"       # the same float32 model; only its decode step runs in int8
        key = (str(model_dir.resolve()), resolved, dtype)
        if self._pipeline is None or self._pipeline_key != key:
            from .backends import load_pipeline

            t0 = time.perf_counter()
            self._pipeline = load_pipeline(model_dir, device=resolved, **({"dtype": dtype} if dtype else {}))
            self._pipeline_key = key
            log.info("model %s loaded on %s in %.2f s", model_dir, resolved, time.perf_counter() - t0)
        if hasattr(self._pipeline, "int8_decode"):
            self._pipeline.int8_decode = int8
        return self._pipeline

    # -- handlers ---------------------------------------------------------------------------
    def info(self, params: dict, context: Context | None = None) -> dict:
        """Versions, device and the model (loaded on demand so the panel can show its size)."""
        import numpy
        import torch

        from .device import describe_device, resolve_device

        device = resolve_device(params.get("device") or self.default_device)
        result: dict[str, Any] = {"engine_version": __version__, **describe_device(device),
                                  "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                               "numpy": numpy.__version__},
                                  "uptime_s": round(time.time() - self.started, 1), "model": None}
        try:
            import faiss
            import rasterio
            import transformers

            result["versions"].update(transformers=transformers.__version__, faiss=faiss.__version__,
                                      rasterio=rasterio.__version__, gdal=rasterio.__gdal_version__)
        except ImportError as exc:  # pragma: no cover - reported, not fatal
            result["versions"]["missing"] = str(exc)
        model = params.get("model")
        model_dir = Path(model) if isinstance(model, str) and model else self.default_model
        if (model_dir / "config.json").is_file() and params.get("load_model", True):
            result["model"] = {"loaded": True, **self.pipeline(str(model_dir), device).info()}
        else:
            result["model"] = {"loaded": False, "path": str(model_dir),
                               "message": f"no model checkpoint at {model_dir}"}
        return result

    def ask(self, params: dict, context: Context | None = None) -> dict:
        """Read the region, answer with the model, georeference boxes, optionally export."""
        from .geo.georef import crs_to_string, grid_boxes_to_polygons, region_polygon
        from .geo.window import read_chip
        from .grounding import grid_to_pixels

        ctx = context or SilentContext()
        p = AskParams.from_dict(params)
        timing: dict[str, float] = {}
        total_steps = 4 if p.out else 3
        t0 = time.perf_counter()
        model_dir = Path(p.model) if p.model else self.default_model

        ctx.progress(0, total_steps, "reading the raster window")
        chip = read_chip(p.raster, bbox=p.bbox, bbox_crs=p.bbox_crs, region_wkt=p.region_wkt,
                         region_crs=p.region_crs, size=model_image_size(model_dir), bands=p.bands)
        timing["window_s"] = time.perf_counter() - t0
        ctx.check_cancelled()

        ctx.progress(1, total_steps, "loading the model")
        t1 = time.perf_counter()
        pipeline = self.pipeline(p.model, p.device, p.precision)
        timing["load_s"] = time.perf_counter() - t1
        ctx.check_cancelled()

        ctx.progress(2, total_steps, "answering")
        t2 = time.perf_counter()
        answer = pipeline.answer([chip.image], p.task, p.question, max_new_tokens=p.max_tokens,
                                 on_token=lambda _i, piece: ctx.token(piece), should_stop=ctx.should_stop)[0]
        timing.update({f"model_{k}": v for k, v in answer.timing.items()})
        timing["answer_s"] = time.perf_counter() - t2
        ctx.check_cancelled()

        out_crs = p.out_crs
        crs_text = crs_to_string(chip.crs) if out_crs is None else out_crs
        polygons = grid_boxes_to_polygons(answer.boxes, chip, out_crs=out_crs)
        height, width = chip.image.shape[:2]
        boxes = []
        for box, score, polygon in zip(answer.boxes, answer.box_scores, polygons):
            boxes.append({"label": box.label or "object", "score": round(float(score), 4),
                          "bbox_grid": [box.x1, box.y1, box.x2, box.y2, box.angle],
                          "bbox_pixel": [round(v, 2) for v in grid_to_pixels(box, width, height)],
                          "wkt": polygon.wkt})
        extent = region_polygon(chip, out_crs=out_crs)
        result = {"task": p.task, "question": p.question or answer.prompt_question, "text": answer.text,
                  "boxes": boxes, "crs": crs_text,
                  "extent": {"wkt": extent.wkt, "bounds": list(extent.bounds)},
                  "retrieved": answer.retrieved, "model": pipeline.name, "device": pipeline.device,
                  "stopped": answer.stopped_reason, "warnings": list(chip.warnings),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if p.out:
            ctx.progress(3, total_steps, f"writing {p.out}")
            result["outputs"] = [str(path) for path in export_result(result, p.out)]
        timing["total_s"] = time.perf_counter() - t0
        result["timing"] = {k: round(v, 4) for k, v in timing.items() if isinstance(v, (int, float))}
        ctx.progress(total_steps, total_steps, "done")
        return result


def export_result(result: dict, out: str) -> list[Path]:
    """Write the asked region and the boxes to a vector file (see engine.geo.export for formats).

    A GeoPackage holds both as layers ``answers`` and ``detections``; single-layer formats
    (Shapefile, GeoJSON) get the detections in a sibling ``<name>_detections`` file.
    """
    from .geo.export import write_features

    common = {"task": result["task"], "question": result["question"] or "", "model": result["model"],
              "created": result["created"]}
    answers = [{"wkt": result["extent"]["wkt"], "answer": result["text"], "label": result["task"],
                "score": 1.0, **common}]
    detections = [{"wkt": b["wkt"], "answer": result["text"], "label": b["label"], "score": b["score"], **common}
                  for b in result["boxes"]]
    path = Path(out)
    written = [write_features(path, answers, result["crs"], layer="answers")]
    if detections:
        if path.suffix.lower() == ".gpkg":
            written.append(write_features(path, detections, result["crs"], layer="detections"))
        else:
            sibling = path.with_name(f"{path.stem}_detections{path.suffix}")
            written.append(write_features(sibling, detections, result["crs"], layer="detections"))
    return written
