"""``python -m engine scan`` as a real subprocess with the embedded model: the JSON summary, bad input,
``kill -9`` in the middle of a scan and the resumed run, and the protocol method ``scan``.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.data.sample_raster import write_sample_geotiff
from engine.paths import DEFAULT_MODEL_DIR
from engine.scan.writer import read_layer

REPO = Path(__file__).resolve().parents[2]
needs_model = pytest.mark.skipif(not (Path(DEFAULT_MODEL_DIR) / "config.json").is_file(),
                                 reason="no embedded model (resources/model)")


def engine(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "mosaic.tif"
    write_sample_geotiff(path, seed=21, grid=(3, 3))
    return path


@needs_model
def test_scan_prints_one_json_summary(mosaic, tmp_path):
    run = engine("scan", "--raster", str(mosaic), "--task", "classify", "--tile", "256", "--out", str(tmp_path / "t.gpkg"))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["layers"] == ["tiles"] and summary["tiles"]["total"] == 9
    assert {"total_s", "tiles_per_s"} <= set(summary["timing"])
    assert len(read_layer(tmp_path / "t.gpkg", "tiles")) == 9


def test_scan_of_a_file_that_is_not_a_raster_exits_2_with_its_code(tmp_path):
    bogus = tmp_path / "bogus.tif"
    bogus.write_text("hello")
    run = engine("scan", "--raster", str(bogus), "--out", str(tmp_path / "o.gpkg"))
    assert run.returncode == 2 and "not_a_raster" in run.stderr and run.stdout == ""


def test_scan_into_a_shapefile_exits_2(mosaic, tmp_path):
    run = engine("scan", "--raster", str(mosaic), "--out", str(tmp_path / "o.shp"))
    assert run.returncode == 2 and ".gpkg" in run.stderr


def _tiles_done(gpkg: Path) -> int:
    try:
        with sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM rs_lvlm_scan_tiles").fetchone()[0])
    except sqlite3.Error:
        return 0


@needs_model
def test_a_scan_killed_with_sigkill_resumes_to_the_layers_of_an_uninterrupted_run(mosaic, tmp_path):
    args = ["scan", "--raster", str(mosaic), "--task", "ground", "--tile", "128", "--batch", "1"]
    cut = tmp_path / "cut.gpkg"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args, "--out", str(cut)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _tiles_done(cut) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = _tiles_done(cut)
    resumed = engine(*args, "--out", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert 3 <= done_at_kill < summary["tiles"]["total"], "the scan finished before it could be killed"
    assert summary["resumed"] and summary["tiles"]["processed"] == summary["tiles"]["total"] - done_at_kill
    whole = engine(*args, "--out", str(tmp_path / "whole.gpkg"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert read_layer(cut, "detections") == read_layer(tmp_path / "whole.gpkg", "detections")


@needs_model
def test_the_protocol_method_scan_reports_progress_then_one_result(mosaic, tmp_path):
    request = {"id": 1, "method": "scan", "params": {"raster": str(mosaic), "task": "classify", "tile": 256,
                                                     "batch": 3, "out": str(tmp_path / "p.gpkg")}}
    run = engine("serve", input=json.dumps(request) + "\n")
    replies = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    progress = [r for r in replies if r.get("type") == "progress"]
    results = [r for r in replies if r.get("type") == "result"]
    assert len(results) == 1 and results[0]["result"]["tiles"]["done"] == 9
    assert progress[-1]["done"] == 9 and progress[-1]["total"] == 9 and "ETA" in progress[-1]["message"]
