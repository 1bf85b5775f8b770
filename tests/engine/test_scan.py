"""Whole-raster scans: tiling, seam merge, nodata, resume bookkeeping, appending runs, bad input.

The rasters are small real GeoTIFFs with bright squares at known pixels; the model is replaced by
a detector that boxes the bright pixels of each tile image (so a square cut by a seam really
comes back as parts, one per tile).  Everything else (windowed reads, georef, STRtree merge,
GeoPackage transactions) is the real scan.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely

from engine.errors import CANCELLED, EngineError
from engine.grounding import pixels_to_grid
from engine.scan.runner import run_scan
from engine.scan.tiling import axis_tiles
from engine.scan.writer import read_layer
from geo_rasters import write_raster

PX = 10.0  # the test rasters' pixel size (EPSG:32633, 10 m)


class BrightBoxDetector:
    """A stand-in model: one box around the bright pixels of each image, label "square"."""

    name = "bright-box"
    device = "cpu"

    def __init__(self) -> None:
        self.images_seen = 0

    def answer(self, images, task, question, max_new_tokens=64, on_token=None, should_stop=None):
        from engine.backends.base import Answer

        out = []
        for image in images:
            self.images_seen += 1
            rows, cols = np.nonzero(image[..., 0] > 128)
            h, w = image.shape[:2]
            boxes = ([pixels_to_grid(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1, 0.0, w, h, "square")]
                     if rows.size else [])
            text = "bright" if rows.size else "dark"
            out.append(Answer(text=text, boxes=boxes, box_scores=[0.9] * len(boxes), retrieved=[],
                              stopped_reason="eos", prompt_question=question or ""))
        return out


class StubService:
    """What the scan needs of the engine service: the model folder and its loaded pipeline."""

    def __init__(self, model_dir: Path) -> None:
        self.default_model = model_dir
        self.detector = BrightBoxDetector()

    def pipeline(self, model, device, precision, backend="auto"):
        return self.detector


class RecordingContext:
    def __init__(self, cancel_after_batches: int | None = None) -> None:
        self.messages: list[tuple[int, int, str]] = []
        self.cancel_after = cancel_after_batches

    def progress(self, done, total, message=""):
        self.messages.append((done, total, message))

    def token(self, text):
        pass

    def should_stop(self):
        return False

    def check_cancelled(self):
        batches = sum(1 for m in self.messages if "so far" in m[2])
        if self.cancel_after is not None and batches >= self.cancel_after:
            raise EngineError(CANCELLED, "the request was cancelled")


@pytest.fixture()
def service(tmp_path: Path) -> StubService:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"image_size": 64, "name": "bright-box"}))
    return StubService(model)


def scan(service, raster, out, ctx=None, **params):
    return run_scan({"raster": str(raster), "out": str(out), "task": "ground", **params},
                    ctx or RecordingContext(), service)


def add_square(path: Path, px: tuple[int, int, int, int], value: int = 220) -> None:
    c0, r0, c1, r1 = px
    with rasterio.open(path, "r+") as ds:
        data = ds.read()
        data[:, r0:r1, c0:c1] = value
        ds.write(data)


def test_tiles_cover_the_axis_with_full_tiles_and_cores_that_meet():
    tiles = axis_tiles(0, 130, 64, 16)
    assert all(size == 64 for _, size, _, _ in tiles)
    assert tiles[0][0] == 0 and tiles[-1][0] + 64 == 130
    cores = [(a, b) for _, _, a, b in tiles]
    assert cores[0][0] == 0 and cores[-1][1] == 130
    assert all(prev[1] == nxt[0] for prev, nxt in zip(cores, cores[1:]))


def test_an_object_split_by_two_tiles_is_reported_once(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, feature_px=(50, 20, 78, 44))
    summary = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert summary["tiles"]["total"] == 2 and len(rows) == 1
    assert shapely.from_wkt(rows[0]["wkt"]).hausdorff_distance(raster.feature_polygon) <= PX
    assert rows[0]["parts"] == 2


def test_an_object_split_by_four_tiles_is_reported_once(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=128, feature_px=(50, 50, 78, 78))
    scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert len(rows) == 1 and rows[0]["parts"] == 4
    assert shapely.from_wkt(rows[0]["wkt"]).hausdorff_distance(raster.feature_polygon) <= PX


def test_with_overlap_the_tile_that_sees_the_whole_object_reports_it(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, feature_px=(50, 20, 78, 44))
    summary = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=16)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert summary["tiles"]["total"] == 3 and len(rows) == 1 and rows[0]["parts"] == 1
    assert shapely.from_wkt(rows[0]["wkt"]).hausdorff_distance(raster.feature_polygon) <= PX


def test_two_objects_on_either_side_of_a_seam_stay_two(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, feature_px=(40, 4, 60, 20))
    add_square(raster.path, (68, 36, 90, 56))
    scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    assert len(read_layer(tmp_path / "out.gpkg", "detections")) == 2


def test_nodata_tiles_are_skipped_and_recorded(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, feature_px=(10, 10, 30, 30),
                          nodata=0, nodata_px=(64, 0, 128, 64))
    summary = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    assert summary["tiles"]["nodata"] == 1 and service.detector.images_seen == 1
    with sqlite3.connect(tmp_path / "out.gpkg") as conn:
        statuses = dict(conn.execute("SELECT tile_id, status FROM rs_lvlm_scan_tiles"))
    assert statuses == {0: "ok", 1: "nodata"}


def test_classify_tiles_form_a_map_without_gaps_or_overlaps(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=150, height=100)
    summary = run_scan({"raster": str(raster.path), "out": str(tmp_path / "out.gpkg"), "task": "classify",
                        "tile": 64, "overlap": 8}, RecordingContext(), service)
    polys = [shapely.from_wkt(r["wkt"]) for r in read_layer(tmp_path / "out.gpkg", "tiles")]
    footprint = shapely.box(*shapely.MultiPolygon(polys).bounds)
    assert summary["layers"] == ["tiles"] and len(polys) == summary["tiles"]["total"]
    assert abs(sum(p.area for p in polys) - 150 * 100 * PX * PX) < 1e-6 * footprint.area
    assert abs(shapely.unary_union(polys).area - footprint.area) < 1e-6 * footprint.area


def test_the_same_scan_again_resumes_and_does_no_work(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=128, feature_px=(50, 50, 78, 78))
    first = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    before = read_layer(tmp_path / "out.gpkg", "detections")
    again = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    assert again["resumed"] and again["run_id"] == first["run_id"] and again["tiles"]["processed"] == 0
    assert read_layer(tmp_path / "out.gpkg", "detections") == before


def test_a_cancelled_scan_keeps_its_batches_and_the_rerun_equals_an_uninterrupted_one(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=192, height=192, feature_px=(50, 50, 140, 78))
    with pytest.raises(EngineError) as err:
        scan(service, raster.path, tmp_path / "cut.gpkg", RecordingContext(cancel_after_batches=2),
             tile=64, overlap=0, batch=2)
    assert err.value.code == CANCELLED
    with sqlite3.connect(tmp_path / "cut.gpkg") as conn:
        assert conn.execute("SELECT count(*) FROM rs_lvlm_scan_tiles").fetchone()[0] == 4
    resumed = scan(service, raster.path, tmp_path / "cut.gpkg", tile=64, overlap=0, batch=2)
    scan(service, raster.path, tmp_path / "whole.gpkg", tile=64, overlap=0, batch=2)
    assert resumed["resumed"] and resumed["tiles"]["processed"] == 5
    assert read_layer(tmp_path / "cut.gpkg", "detections") == read_layer(tmp_path / "whole.gpkg", "detections")


def test_a_scan_with_other_arguments_appends_under_its_own_run_id(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, feature_px=(50, 20, 78, 44))
    a = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    b = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0, question="find squares")
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert a["run_id"] != b["run_id"] and not b["resumed"]
    assert sorted(r["run_id"] for r in rows) == sorted([a["run_id"], b["run_id"]])


def test_a_bbox_limits_the_scan_to_the_tiles_it_touches(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=256, height=64, feature_px=(10, 10, 30, 30))
    x0, y0 = raster.transform @ (0, 64)
    summary = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0,
                   bbox=[x0, y0, x0 + 100 * PX, y0 + 64 * PX])
    assert summary["tiles"]["total"] == 2


def test_progress_reports_tiles_done_of_total_and_detections(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=128, height=128, feature_px=(50, 50, 78, 78))
    ctx = RecordingContext()
    scan(service, raster.path, tmp_path / "out.gpkg", ctx, tile=64, overlap=0, batch=1)
    done = [m for m in ctx.messages if "so far" in m[2]]
    assert [d for d, _, _ in done] == [1, 2, 3, 4] and all(t == 4 for _, t, _ in done)
    assert "1 detections so far" in done[-1][2] and "ETA" in done[-1][2]


@pytest.mark.parametrize("params, code", [
    ({"tile": 32}, "bad_request"),                          # smaller than the model input (64 px)
    ({"out": "out.shp"}, "bad_request"),                    # not a GeoPackage
    ({"bbox": [0, 0, 10, 10]}, "region_off_raster"),        # an extent off the raster
    ({"task": "vqa"}, "bad_request"),                       # not a scan task
    ({"overlap": 40, "tile": 64}, "bad_request"),           # overlap more than half the tile
])
def test_bad_input_is_a_coded_error(tmp_path, service, params, code):
    raster = write_raster(tmp_path / "r.tif", width=128, height=64)
    full = {"raster": str(raster.path), "out": str(tmp_path / "out.gpkg"), "task": "ground", **params}
    if not full["out"].startswith("/"):
        full["out"] = str(tmp_path / full["out"])
    with pytest.raises(EngineError) as err:
        run_scan(full, RecordingContext(), service)
    assert err.value.code == code


def test_a_file_that_is_not_a_raster_is_a_coded_error(tmp_path, service):
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(EngineError) as err:
        scan(service, text, tmp_path / "out.gpkg")
    assert err.value.code == "not_a_raster"


def test_tiles_of_a_16_bit_raster_share_one_stretch(tmp_path, service):
    # Stretched tile by tile, the square-free tile's faint texture would fill 0..255 and look bright.
    raster = write_raster(tmp_path / "r.tif", width=128, height=64, dtype="uint16", background=1000,
                          feature=30000, feature_px=(10, 10, 40, 40))
    scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert len(rows) == 1 and rows[0]["tile_id"] == 0


def test_a_second_scan_into_a_file_being_written_is_refused(tmp_path):
    from rasterio.crs import CRS

    from engine.scan.writer import ScanWriter

    with ScanWriter(tmp_path / "out.gpkg", "run-a", CRS.from_epsg(32633), "detections"):
        with pytest.raises(EngineError) as err:
            ScanWriter(tmp_path / "out.gpkg", "run-b", CRS.from_epsg(32633), "detections")
    assert err.value.code == "export_failed" and "another scan" in err.value.message
    ScanWriter(tmp_path / "out.gpkg", "run-b", CRS.from_epsg(32633), "detections").close()  # free again


def test_a_region_polygon_keeps_the_objects_inside_it_and_clips_the_tiles(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", width=256, height=64, feature_px=(10, 10, 30, 30))
    add_square(raster.path, (200, 10, 230, 30))
    left = shapely.box(*(raster.transform @ (0, 64)), *(raster.transform @ (100, 0)))
    run_scan({"raster": str(raster.path), "out": str(tmp_path / "d.gpkg"), "task": "ground", "tile": 64,
              "overlap": 0, "region_wkt": left.wkt}, RecordingContext(), service)
    summary = run_scan({"raster": str(raster.path), "out": str(tmp_path / "t.gpkg"), "task": "classify", "tile": 64,
                        "overlap": 0, "region_wkt": left.wkt}, RecordingContext(), service)
    detections = read_layer(tmp_path / "d.gpkg", "detections")
    tiles = [shapely.from_wkt(r["wkt"]) for r in read_layer(tmp_path / "t.gpkg", "tiles")]
    assert len(detections) == 1 and shapely.from_wkt(detections[0]["wkt"]).within(left.buffer(1e-6))
    assert summary["tiles"]["total"] == 2 and abs(shapely.unary_union(tiles).area - left.area) < 1e-6 * left.area


def test_a_raster_without_georeferencing_is_scanned_in_pixel_coordinates(tmp_path, service):
    raster = write_raster(tmp_path / "r.tif", crs=None, width=128, height=64, feature_px=(50, 20, 78, 44))
    summary = scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=0)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert summary["crs"] is None and len(rows) == 1
    assert shapely.from_wkt(rows[0]["wkt"]).hausdorff_distance(shapely.box(50, 20, 78, 44)) <= 1.0


@pytest.mark.parametrize("overlap", [8, 16, 24])
def test_an_object_at_a_four_tile_corner_is_reported_once_whatever_the_overlap(tmp_path, service, overlap):
    raster = write_raster(tmp_path / "r.tif", width=160, height=160, feature_px=(52, 52, 84, 84))
    scan(service, raster.path, tmp_path / "out.gpkg", tile=64, overlap=overlap)
    rows = read_layer(tmp_path / "out.gpkg", "detections")
    assert len(rows) == 1
    assert shapely.from_wkt(rows[0]["wkt"]).hausdorff_distance(raster.feature_polygon) <= PX
