"""The engine's request handlers: ``info`` and ``ask``, shared by the server and the CLI.

One ``EngineService`` lives as long as the engine process and keeps the model loaded between
requests (loading is the slow part; answering is fast). Bad input is checked before the model
is touched, so an analyst with a wrong region hears about it at once, even with no model.
"""
from __future__ import annotations

import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .errors import BAD_REQUEST, EMPTY_REGION, NO_MODEL, EngineError
from .paths import DEFAULT_MODEL_DIR
from .protocol.schema import MAX_PATH_CHARS, AskParams
from .tasks import canonical_precision

log = logging.getLogger("engine.service")

DEFAULT_IMAGE_SIZE = 128
TINY_REGION_PIXELS = 4
"""A region narrower than this many source pixels is refused: nothing there to answer about."""


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


def model_image_size(model_dir: Path) -> int:
    """The model's input size from its config.json (bounds-checked), read without loading torch."""
    from .backends import checkpoint_config

    config = checkpoint_config(model_dir)
    size = config.get("image_size") or (config.get("vision_config") or {}).get("image_size")
    return int(size or DEFAULT_IMAGE_SIZE)


def require_model_dir(model_dir: Path) -> None:
    """Fail with the message an analyst needs when there is no checkpoint yet."""
    try:
        present = (model_dir / "config.json").is_file()
    except OSError as exc:                       # a path component longer than the file system allows
        raise EngineError(NO_MODEL, f"the model path cannot be used: {exc.strerror or exc}") from None
    if not present:
        raise EngineError(
            NO_MODEL,
            f"no model checkpoint at {model_dir} (config.json missing). Train the embedded model with "
            f"'make model' (python -m engine train) or pass --model DIR pointing at a checkpoint folder.")


class EngineService:
    """Keeps one model loaded per (folder, device) and answers ``info`` and ``ask``."""

    def __init__(self, default_model: str | Path | None = None, default_device: str = "auto",
                 knowledge_dir: str | Path | None = None) -> None:
        self.default_model = Path(default_model) if default_model else DEFAULT_MODEL_DIR
        self.default_device = default_device
        # the analyst's rebuilt knowledge index (serve --knowledge), used instead of the checkpoint's
        self.knowledge_dir = Path(knowledge_dir) if knowledge_dir else None
        self._pipeline: Any = None
        self._pipeline_key: tuple | None = None
        self.started = time.time()

    # -- model ------------------------------------------------------------------------------
    def pipeline(self, model: str | None, device: str | None, precision: str = "auto", backend: str = "auto") -> Any:
        """Load (once) and return the inference pipeline for a model folder, device and precision.

        ``auto`` is float32 on the CPU and bfloat16 on CUDA; ``bfloat16`` on a CPU halves the
        memory.  ``int8`` is for the CPU: the embedded model keeps its float32 weights for the
        prefill and decodes with int8 matrices; a LLaVA-family model loads with a weight-only
        int8 language model (so a 7B fits a 16 GB machine).
        """
        from .device import resolve_device

        model_dir = Path(model) if model else self.default_model
        require_model_dir(model_dir)
        resolved = resolve_device(device or self.default_device)
        dtype = {"auto": None}.get(canonical_precision(precision), canonical_precision(precision))
        int8 = dtype == "int8"
        int8_decode = False
        if int8:
            # Checked before loading anything: a refused request keeps the loaded model.
            from .backends import backend_for

            if resolved != "cpu":
                raise EngineError(BAD_REQUEST, "int8 precision is for the CPU; use bfloat16 or float16 on CUDA")
            if backend_for(model_dir) == "rs_lvlm":
                dtype, int8_decode = "float32", True    # the same float32 model; its decode step runs in int8
        key = (str(model_dir.resolve()), resolved, dtype, backend)
        if self._pipeline is None or self._pipeline_key != key:
            from .backends import load_pipeline

            t0 = time.perf_counter()
            options = {"dtype": dtype} if dtype else {}
            if self.knowledge_dir is not None:
                options["knowledge_dir"] = self.knowledge_dir
            self._pipeline = load_pipeline(model_dir, device=resolved, backend=backend, **options)
            self._pipeline_key = key
            log.info("model %s loaded on %s in %.2f s", model_dir, resolved, time.perf_counter() - t0)
        if int8_decode or getattr(self._pipeline, "int8_decode", False):
            self._pipeline.int8_decode = int8_decode    # only the embedded family has it (checked above)
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
        model = params.get("model") if isinstance(params, dict) else None
        if model is not None and (not isinstance(model, str) or len(model) > MAX_PATH_CHARS or "\x00" in model):
            raise EngineError(BAD_REQUEST, f"parameter 'model' must be a path of at most {MAX_PATH_CHARS} characters")
        model_dir = Path(model) if model else self.default_model
        from .backends import checkpoint_config

        if checkpoint_config(model_dir) and params.get("load_model", True):   # present and within bounds
            result["model"] = {"loaded": True, **self.pipeline(str(model_dir), device).info()}
        else:
            result["model"] = {"loaded": False, "path": str(model_dir),
                               "message": f"no model checkpoint at {model_dir}"}
        return result

    def ask(self, params: dict, context: Context | None = None) -> dict:
        """Read the region, answer with the model, georeference boxes, optionally export."""
        from .geo.georef import chip_box_to_raster_pixels, crs_to_string, grid_boxes_to_polygons, region_polygon
        from .geo.window import read_chip
        from .grounding import grid_to_pixels, readable_text

        ctx = context or SilentContext()
        p = AskParams.from_dict(params)
        timing: dict[str, float] = {}
        total_steps = 4 if p.out else 3
        t0 = time.perf_counter()
        model_dir = Path(p.model) if p.model else self.default_model

        ctx.progress(0, total_steps, "reading the raster window")
        chip = read_chip(p.raster, bbox=p.bbox, bbox_crs=p.bbox_crs, region_wkt=p.region_wkt,
                         region_crs=p.region_crs, size=model_image_size(model_dir), bands=p.bands)
        refuse_tiny_region(chip)
        refuse_outputs_without_crs(chip, p)
        timing["window_s"] = time.perf_counter() - t0
        ctx.check_cancelled()

        ctx.progress(1, total_steps, "loading the model")
        t1 = time.perf_counter()
        pipeline = self.pipeline(p.model, p.device, p.precision, p.backend)
        timing["load_s"] = time.perf_counter() - t1
        ctx.check_cancelled()

        ctx.progress(2, total_steps, "answering")
        t2 = time.perf_counter()
        options = {"history": p.history} if p.history else {}
        answer = pipeline.answer([chip.image], p.task, p.question, max_new_tokens=p.max_tokens,
                                 on_token=lambda _i, piece: ctx.token(piece), should_stop=ctx.should_stop,
                                 **options)[0]
        timing.update({f"model_{k}": v for k, v in answer.timing.items()})
        timing["answer_s"] = time.perf_counter() - t2
        ctx.check_cancelled()

        warnings = list(chip.warnings) + list(getattr(pipeline, "load_warnings", []))
        if chip.crs is None:
            crs_text = None
            warnings.append("the raster has no CRS: wkt and extent are in the raster's pixel coordinates")
        else:
            crs_text = crs_to_string(chip.crs) if p.out_crs is None else p.out_crs
        polygons = grid_boxes_to_polygons(answer.boxes, chip, out_crs=p.out_crs)
        height, width = chip.image.shape[:2]
        boxes = []
        for box, score, polygon in zip(answer.boxes, answer.box_scores, polygons):
            chip_pixels = grid_to_pixels(box, width, height)
            boxes.append({"label": box.label or "object", "score": round(float(score), 4),
                          "bbox_grid": [box.x1, box.y1, box.x2, box.y2, box.angle],
                          "bbox_chip": [round(v, 2) for v in chip_pixels],
                          "bbox_pixel": [round(v, 2) for v in chip_box_to_raster_pixels(chip_pixels, chip)],
                          "wkt": polygon.wkt})
        extent = region_polygon(chip, out_crs=p.out_crs)
        result = {"task": p.task, "question": p.question or answer.prompt_question,
                  "text": readable_text(answer.text, p.task), "raw": answer.text,
                  "confidence": None if answer.text_score is None else round(float(answer.text_score), 4),
                  "boxes": boxes, "crs": crs_text,
                  "extent": {"wkt": extent.wkt, "bounds": list(extent.bounds)},
                  "retrieved": answer.retrieved, "model": pipeline.name, "device": pipeline.device,
                  "stopped": answer.stopped_reason, "warnings": warnings, "raster": p.raster,
                  "history_turns": len(p.history or []),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if p.out:
            ctx.progress(3, total_steps, f"writing {p.out}")
            result["outputs"] = [str(path) for path in export_result(result, p.out)]
        timing["total_s"] = time.perf_counter() - t0
        result["timing"] = {k: round(v, 4) for k, v in timing.items() if isinstance(v, (int, float))}
        ctx.progress(total_steps, total_steps, "done")
        return result


def refuse_outputs_without_crs(chip: Any, p: AskParams) -> None:
    """Before the model runs: what a raster without a CRS cannot give (a reprojection, GeoJSON,
    which is WGS 84 by definition)."""
    if chip.crs is not None:
        return
    if p.out_crs is not None:
        raise EngineError(BAD_REQUEST, "the raster has no CRS, so out_crs cannot be applied; leave it out "
                                       "(results are then in the raster's pixel coordinates)")
    if p.out and Path(p.out).suffix.lower() in (".geojson", ".json"):
        raise EngineError(BAD_REQUEST, "the raster has no CRS and GeoJSON is always WGS 84: write a .gpkg or .shp")


def refuse_tiny_region(chip: Any) -> None:
    """A region a few source pixels wide has nothing in it the model could answer about."""
    window = getattr(chip, "source_window", None)
    if window is None:
        return
    if min(window.width, window.height) < TINY_REGION_PIXELS:
        raise EngineError(EMPTY_REGION, (
            f"the region covers only {int(window.width)}x{int(window.height)} source pixels of the raster, far "
            f"below the model's scale (it reads {getattr(chip, 'image', None).shape[1]} px chips); draw a larger region"))


def export_result(result: dict, out: str) -> list[Path]:
    """Write the asked region and the boxes to a vector file (see engine.geo.export for formats).

    A GeoPackage holds both as layers ``answers`` and ``detections``; single-layer formats
    (Shapefile, GeoJSON) get the detections in a sibling ``<name>_detections`` file.
    """
    from .geo.export import write_features

    common = {"task": result["task"], "question": result["question"] or "", "model": result["model"],
              "created": result["created"], "raw": result.get("raw", ""), "raster": result.get("raster", "")}
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
