"""Evaluation as an analyst meets the model: a fresh georeferenced mosaic asked tile by tile.

``python -m engine evaluate --model DIR --mosaic [--seed S] --json`` writes a new mosaic (its own
seed, CRS and pixel size, so nothing matches the shipped sample), asks every tile through the
engine service (the code path of the protocol's ``ask``: window reading, CRS, georeferencing)
and scores in map coordinates against the mosaic's truth file:

* scene: the classify answer of each tile;
* counts: "How many <class>s are there?" for every class present in a tile;
* grounding: the bare noun phrase an analyst types ("storage tanks"), per present class; the
  returned polygons are matched to the true boxes by IoU in map units: precision and recall at
  IoU 0.5.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from engine.lab.metrics import match_geometries

__all__ = ["evaluate_mosaic"]


def evaluate_mosaic(model_dir: Path, seed: int = 2027, grid: tuple[int, int] = (4, 5), crs: str = "EPSG:32632",
                    pixel_size: float = 0.6, device: str = "cpu", grammar: str = "evidence") -> dict:
    """Scores of ``model_dir`` on a fresh mosaic of ``grid`` tiles (see the module docstring);
    ``grammar`` as in :func:`engine.lab.evaluate.evaluate`."""
    from shapely import wkt as shapely_wkt
    from shapely.geometry import box

    from engine.data.instructions import plural
    from engine.data.sample_raster import write_sample_geotiff
    from engine.service import EngineService, SilentContext

    service, ctx = EngineService(model_dir, device), SilentContext()
    service.pipeline(str(model_dir), device).grammar = grammar
    with tempfile.TemporaryDirectory() as tmp:
        raster = Path(tmp) / "mosaic.tif"
        truth = write_sample_geotiff(raster, seed=seed, grid=grid, crs=crs, origin=(420000.0, 5100000.0),
                                     pixel_size=pixel_size)
        scene_hits = count_hits = count_n = tp = n_pred = n_true = 0
        for tile in truth["tiles"]:
            left, bottom, right, top = tile["bounds"]
            base = {"raster": str(raster), "bbox": [left, bottom, right, top], "bbox_crs": crs, "model": str(model_dir)}
            result = service.ask({**base, "task": "classify"}, ctx)
            scene_hits += int(result["text"].strip().lower() == tile["scene_class"])
            counts = Counter(o["cls"] for o in tile["objects"])
            for cls, n in sorted(counts.items()):
                answer = service.ask({**base, "task": "vqa", "question": f"How many {plural(cls)} are there?"}, ctx)
                count_hits += int(answer["text"].strip() == str(min(9, n)))
                count_n += 1
                phrase = plural(cls) if n > 1 else cls
                grounded = service.ask({**base, "task": "ground", "question": phrase}, ctx)
                pred = [shapely_wkt.loads(b["wkt"]) for b in grounded["boxes"]]
                true = [box(*o["bbox_map"]) for o in tile["objects"] if o["cls"] == cls]
                tp += match_geometries(pred, true)
                n_pred, n_true = n_pred + len(pred), n_true + len(true)
    return {"mosaic": {"seed": seed, "grid": list(grid), "crs": crs, "pixel_size": pixel_size, "grammar": grammar,
                       "tiles": len(truth["tiles"])},
            "scene_accuracy": round(scene_hits / len(truth["tiles"]), 4),
            "count_accuracy": round(count_hits / max(count_n, 1), 4), "count_questions": count_n,
            "grounding_precision50": round(tp / max(n_pred, 1), 4),
            "grounding_recall50": round(tp / max(n_true, 1), 4), "objects": n_true}
