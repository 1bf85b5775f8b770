"""The shipped model on the shipped sample: the product's main job, end to end, in the engine.

A region is given in EPSG:3857 (as a QGIS canvas sends it) over the UTM 33N sample raster; the
answers, boxes and exports must come back in the raster's CRS, inside the asked region.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiona
import pytest
from rasterio.warp import transform_bounds
from shapely import wkt as shapely_wkt
from shapely.geometry import box

from engine.paths import DEFAULT_MODEL_DIR, SAMPLE_RASTER
from engine.service import EngineService

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="no embedded model in resources/model yet")


@pytest.fixture(scope="module")
def service() -> EngineService:
    return EngineService()


@pytest.fixture(scope="module")
def tiles() -> list[dict]:
    return json.loads(SAMPLE_RASTER.with_name(SAMPLE_RASTER.name + ".truth.json").read_text())["tiles"]


def tile_of(tiles: list[dict], scene: str) -> dict:
    return next(t for t in tiles if t["scene_class"] == scene)


def canvas_bbox(tile: dict, keep: float = 0.9) -> list[float]:
    """The tile's central part as an EPSG:3857 box, like a rectangle drawn on a web-mercator canvas."""
    left, bottom, right, top = tile["bounds"]
    dx, dy = (right - left) * (1 - keep) / 2, (top - bottom) * (1 - keep) / 2
    return list(transform_bounds("EPSG:32633", "EPSG:3857", left + dx, bottom + dy, right - dx, top - dy))


def test_ground_on_airport_returns_boxes_inside_the_region_in_the_raster_crs(service, tiles):
    tile = tile_of(tiles, "airport")
    result = service.ask({"raster": str(SAMPLE_RASTER), "bbox": canvas_bbox(tile), "bbox_crs": "EPSG:3857",
                          "task": "ground", "question": "[grounding] Locate all airplanes."})
    assert result["crs"] == "EPSG:32633"
    region = shapely_wkt.loads(result["extent"]["wkt"])
    assert region.within(box(*tile["bounds"]).buffer(1.0))
    assert result["boxes"], f"no boxes in {result['text']!r}"
    for b in result["boxes"]:
        polygon = shapely_wkt.loads(b["wkt"])
        assert polygon.within(region.buffer(0.5)), b
        assert 0.0 < b["score"] <= 1.0


def test_classify_answers_with_a_scene_class_and_explains_with_knowledge(service, tiles):
    tile = tile_of(tiles, "harbor")
    result = service.ask({"raster": str(SAMPLE_RASTER), "bbox": canvas_bbox(tile), "bbox_crs": "EPSG:3857",
                          "task": "classify"})
    assert result["text"]
    levels = {r["level"] for r in result["retrieved"]}
    assert levels == {"object", "region", "scene"}
    assert all(isinstance(r["score"], float) and r["entry"] for r in result["retrieved"])


def test_ask_streams_tokens_that_join_into_the_answer(service, tiles):
    pieces: list[str] = []

    class Collect:
        def progress(self, done, total, message=""):
            pass

        def token(self, text):
            pieces.append(text)

        def should_stop(self):
            return False

        def check_cancelled(self):
            pass

    tile = tile_of(tiles, "forest")
    result = service.ask({"raster": str(SAMPLE_RASTER), "bbox": canvas_bbox(tile), "bbox_crs": "EPSG:3857",
                          "task": "caption"}, Collect())
    assert pieces and "".join(pieces).strip() == result["text"]


def test_ask_exports_answers_and_detections_to_geopackage_in_raster_crs(service, tiles, tmp_path):
    out = tmp_path / "result.gpkg"
    tile = tile_of(tiles, "industrial")
    result = service.ask({"raster": str(SAMPLE_RASTER), "bbox": canvas_bbox(tile), "bbox_crs": "EPSG:3857",
                          "task": "ground", "question": "[grounding] Locate all storage tanks.", "out": str(out)})
    with fiona.open(out, layer="answers") as layer:
        assert layer.crs.to_epsg() == 32633
        features = list(layer)
    assert len(features) == 1 and features[0]["properties"]["answer"] == result["text"]
    if result["boxes"]:
        with fiona.open(out, layer="detections") as layer:
            assert len(list(layer)) == len(result["boxes"])


def test_cli_ask_prints_one_json_result_for_the_embedded_model(tiles):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    bbox = [str(v) for v in canvas_bbox(tile_of(tiles, "parking lot"))]
    proc = subprocess.run([sys.executable, "-m", "engine", "ask", "--raster", str(SAMPLE_RASTER), "--bbox", *bbox,
                           "--bbox-crs", "EPSG:3857", "--task", "vqa", "--question", "How many vehicles are there?"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["task"] == "vqa" and result["text"] and result["crs"] == "EPSG:32633"


def test_evaluate_command_prints_every_score_as_json():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "evaluate", "--seed", "5", "--n", "12", "--json"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout)
    for key in ("scene_accuracy", "vqa_accuracy", "grounding_acc50", "grounding_mean_iou", "caption_bleu4",
                "caption_cider", "retrieval_hit_rate", "vqa_follow_up_accuracy"):
        assert key in scores
    assert 0.0 <= scores["vqa_follow_up_accuracy"] <= 1.0
