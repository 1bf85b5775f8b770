"""The scan: tiles in batches through the loaded model, seam merge, and a resumable GeoPackage.

Why this split of work: the part that needs the model and the raster's pixels
(:func:`infer_batch`: read the tiles of a batch, answer them in one forward pass, georeference
the boxes through :mod:`engine.geo.georef`) is a pure function of the batch, so it runs the same
here or inside a Ray actor (:mod:`engine.scan.ray_runner`); the merge and the writes stay in this
process, which alone owns the output file.  Batches are fixed slices of the tile list, so a
resumed or distributed scan puts the same tiles through the model together and gets the same
numbers.  Cancel is honoured between batches; a batch whose generation was stopped is not
written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import shapely
from shapely.geometry import Polygon

from engine.geo.georef import chip_box_to_raster_pixels, crs_to_string, grid_boxes_to_polygons
from engine.grounding import GRID_MAX, grid_to_pixels, readable_text

from .merge import DEFAULT_TOL_PX, RawBox, SeamMerger, keep_box, touches_edges
from .params import ScanRequest
from .tiling import Tile, TilePlan, plan_tiles, read_tile, shared_stretch, tile_polygon
from .writer import ScanWriter

log = logging.getLogger("engine.scan")

__all__ = ["TileResult", "infer_batch", "run_scan", "scan_handler", "LAYER_OF_TASK"]

LAYER_OF_TASK = {"ground": "detections", "classify": "tiles", "caption": "tiles"}
DEFAULT_OVERLAP = {"ground": 0.25, "classify": 0.0, "caption": 0.0}
"""Overlap as a fraction of the tile: detection needs objects whole in some tile; a land-use map not."""


@dataclass
class TileResult:
    """What the model said about one tile, georeferenced; plain data so it crosses to Ray and back."""

    tile_id: int
    status: str                        # "ok" or "nodata"
    text: str = ""
    score: float | None = None
    boxes: list[dict] = field(default_factory=list)   # label, score, angle, px (raster pixels), wkb hex

    def to_dict(self) -> dict:
        return {"tile_id": self.tile_id, "status": self.status, "text": self.text, "score": self.score,
                "boxes": self.boxes}

    @classmethod
    def from_dict(cls, d: dict) -> "TileResult":
        return cls(int(d["tile_id"]), str(d["status"]), str(d.get("text") or ""), d.get("score"),
                   list(d.get("boxes") or []))


@dataclass
class InferenceSpec:
    """What every batch is asked: the same in this process and in each Ray actor."""

    task: str
    question: str | None
    max_tokens: int
    bands: list[int] | None
    image_size: int
    stretch: list[tuple[float, float]] | None = None   # one stretch for every tile (non-8-bit rasters)


def infer_batch(pipeline: Any, plan: TilePlan, tiles: Sequence[Tile], spec: InferenceSpec,
                should_stop: Callable[[], bool] | None = None) -> list[TileResult]:
    """Read the batch's tiles (windowed), answer the valid ones in one call, georeference boxes."""
    chips = [read_tile(plan, t, spec.image_size, spec.bands, spec.stretch) for t in tiles]
    valid = [(t, c) for t, c in zip(tiles, chips) if c is not None]
    results = {t.id: TileResult(t.id, "nodata") for t, c in zip(tiles, chips) if c is None}
    if valid:
        answers = pipeline.answer([c.image for _, c in valid], spec.task, spec.question,
                                  max_new_tokens=spec.max_tokens, should_stop=should_stop)
        for (tile, chip), answer in zip(valid, answers):
            polygons = grid_boxes_to_polygons(answer.boxes, chip)
            h, w = chip.image.shape[:2]
            boxes = [{"label": g.label or "object", "score": float(s), "angle": float(g.angle),
                      "px": list(chip_box_to_raster_pixels(grid_to_pixels(g, w, h), chip)),
                      "wkb": shapely.to_wkb(poly, hex=True)}
                     for g, s, poly in zip(answer.boxes, answer.box_scores, polygons)]
            score = getattr(answer, "text_score", None)
            results[tile.id] = TileResult(tile.id, "ok", readable_text(answer.text), None if score is None else float(score),
                                          boxes)
    return [results[t.id] for t in tiles]


def raw_boxes(result: TileResult, tile: Tile, plan: TilePlan, min_score: float, tol_px: float) -> list[RawBox]:
    """A tile's boxes kept for the merge: score >= min_score, centre in the area, not cut away."""
    out = []
    for k, b in enumerate(result.boxes):
        px = tuple(float(v) for v in b["px"])
        if b["score"] < min_score or not keep_box(px, tile.window, tile.core, tile.interior, tol_px):
            continue
        geom = shapely.from_wkb(b["wkb"])
        if plan.region is not None and not plan.region.contains(geom.centroid):
            continue
        out.append(RawBox((tile.id, k), str(b["label"]), float(b["score"]), geom, px, float(b["angle"]),
                          touches_edges(px, tile.window, tile.interior, tol_px)))
    return out


def tile_feature(result: TileResult, tile: Tile, plan: TilePlan, task: str) -> tuple[Polygon, dict] | None:
    """The "tiles" layer feature of a classify or caption answer: the tile's core, clipped to the area."""
    geom = tile_polygon(plan, tile, core=True)
    if plan.region is not None:
        geom = geom.intersection(plan.region)
        if geom.is_empty or geom.geom_type != "Polygon":
            geom = geom.envelope if not geom.is_empty else None
    if geom is None:
        return None
    label = result.text.strip().rstrip(".").lower() if task == "classify" else ""
    return geom, {"tile_id": tile.id, "row": tile.row, "col": tile.col, "task": task, "label": label,
                  "score": result.score, "text": result.text}


def local_results(pipeline: Any, plan: TilePlan, chunks: Sequence[Sequence[Tile]], spec: InferenceSpec,
                  should_stop: Callable[[], bool]) -> Iterator[list[TileResult]]:
    for chunk in chunks:
        yield infer_batch(pipeline, plan, chunk, spec, should_stop)


def _raster_stamp(path: str) -> str:
    try:
        st = Path(path).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return ""


def run_scan(params: dict, context: Any, service: Any) -> dict:
    """The ``scan`` request: validate, plan, resume or start the run, then batch after batch."""
    from engine.service import model_image_size

    t0 = time.perf_counter()
    p = ScanRequest.from_dict(params)
    model_dir = Path(p.model) if p.model else Path(service.default_model)
    image_size = model_image_size(model_dir)
    plan = plan_tiles(p.raster, tile_px=p.tile, overlap_px=p.overlap, model_dir=model_dir, image_size=image_size,
                      bbox=p.bbox, bbox_crs=p.bbox_crs, region_wkt=p.region_wkt, region_crs=p.region_crs,
                      default_overlap=DEFAULT_OVERLAP[p.task])
    run_id = p.run_id(_raster_stamp(plan.raster), plan.tile_px, plan.overlap_px)
    layer = LAYER_OF_TASK[p.task]
    spec = InferenceSpec(p.task, p.question, p.max_tokens, p.bands, image_size, shared_stretch(plan, p.bands))
    total = len(plan.tiles)
    with ScanWriter(p.out, run_id, plan.crs, layer) as writer:
        resumed = writer.start_run({**p.to_dict(), "tile": plan.tile_px, "overlap": plan.overlap_px}, total)
        done = writer.done_tiles()
        # One step of the model's 0-100 box grid, in raster pixels, is as close as boxes can be told apart.
        tol_px = max(DEFAULT_TOL_PX, plan.tile_px / GRID_MAX)
        merger = SeamMerger(plan.neighbours, lambda px: plan.pixel_polygons([px])[0], plan.pixel_size, tol_px=tol_px)
        chunks = [plan.tiles[i:i + p.batch] for i in range(0, total, p.batch)]
        todo = [c for c in chunks if any(t.id not in done for t in c)]
        context.progress(len(done), total, f"{len(done)}/{total} tiles done; loading the model")
        t_load = time.perf_counter()
        pipeline = None if (p.ray is not None or not todo) else service.pipeline(p.model, p.device, p.precision, p.backend)
        load_s = time.perf_counter() - t_load
        model_name = getattr(pipeline, "name", None) or _model_name(model_dir)
        common = {"question": p.question or "", "model": model_name}
        if p.task == "ground" and done:
            # A resume: rebuild the merge from the committed raw boxes and rewrite this run's detections.
            _, detections = merger.add(writer.raw_boxes())
            writer.commit_batch([], detections=detections, common=common, clear=True)
        context.check_cancelled()
        if p.ray is not None and todo:
            from .ray_runner import ray_results

            stream = ray_results(plan, todo, spec, p, model_dir, getattr(service, "knowledge_dir", None))
        else:
            stream = local_results(pipeline, plan, todo, spec, context.should_stop)
        tiles_by_id = {t.id: t for t in plan.tiles}
        n_done, n_new, nodata = len(done), 0, sum(1 for s in done.values() if s == "nodata")
        t_work = time.perf_counter()
        for results in stream:
            context.check_cancelled()
            fresh = [r for r in results if r.tile_id not in done]
            boxes = [b for r in fresh if r.status == "ok"
                     for b in raw_boxes(r, tiles_by_id[r.tile_id], plan, p.min_score, tol_px)]
            replaced, detections = merger.add(boxes) if p.task == "ground" else ([], [])
            rows = [] if p.task == "ground" else [f for r in fresh if r.status == "ok"
                                                 for f in [tile_feature(r, tiles_by_id[r.tile_id], plan, p.task)] if f]
            writer.commit_batch([(r.tile_id, r.status) for r in fresh], boxes, replaced, detections, rows, common)
            done.update({r.tile_id: r.status for r in fresh})
            n_done += len(fresh)
            n_new += len(fresh)
            nodata += sum(1 for r in fresh if r.status == "nodata")
            rate = n_new / max(time.perf_counter() - t_work, 1e-9)
            eta = (total - n_done) / rate if rate > 0 else 0.0
            found = merger.detection_count if p.task == "ground" else writer.count()
            context.progress(n_done, total, f"{n_done}/{total} tiles, {found} "
                                            f"{'detections' if p.task == 'ground' else 'tiles'} so far, ETA {eta:.0f} s")
        work_s = time.perf_counter() - t_work
        writer.finish_run()
        features = writer.count()
    return {
        "run_id": run_id, "task": p.task, "question": p.question or "", "raster": plan.raster, "out": p.out,
        "layers": [layer], "crs": crs_to_string(plan.crs) if plan.crs is not None else None,
        "tiles": {"total": total, "done": n_done, "processed": n_new, "nodata": nodata,
                  "tile_px": plan.tile_px, "overlap_px": plan.overlap_px, "rows": plan.rows, "cols": plan.cols},
        "detections": features if p.task == "ground" else 0, "features": features, "resumed": resumed,
        "batch": p.batch, "ray": None if p.ray is None else (p.ray or "local"), "model": model_name, "warnings": list(plan.warnings),
        "timing": {"total_s": round(time.perf_counter() - t0, 3), "model_load_s": round(load_s, 3),
                   "tiles_s": round(work_s, 3), "tiles_per_s": round(n_new / work_s, 3) if work_s > 0 else None},
    }


def _model_name(model_dir: Path) -> str:
    from engine.backends import checkpoint_config

    return str(checkpoint_config(model_dir).get("name") or model_dir.name)


def scan_handler(service: Any) -> Callable[[dict, Any], dict]:
    """The protocol handler for ``scan`` bound to the engine's service (its loaded model)."""
    def handle(params: dict, context: Any) -> dict:
        from engine.service import SilentContext

        return run_scan(params, context or SilentContext(), service)
    return handle
