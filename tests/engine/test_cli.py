"""The engine's command line: one JSON object on success, one clear line and exit 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.protocol.schema import AskParams
from engine.service import EngineService

sys.path.insert(0, str(Path(__file__).parent))
from geo_rasters import write_raster  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_engine(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_ask_on_missing_raster_exits_2_with_one_line(tmp_path):
    proc = run_engine("ask", "--raster", str(tmp_path / "missing.tif"), "--bbox", "0", "0", "1", "1",
                      "--task", "caption")
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error (raster_not_found)") and "missing.tif" in last


def test_ask_without_model_names_the_missing_checkpoint(tmp_path):
    raster = write_raster(tmp_path / "utm.tif", crs="EPSG:32633")
    left, top = raster.transform.c, raster.transform.f
    proc = run_engine("ask", "--raster", str(raster.path), "--bbox", str(left), str(top - 500), str(left + 500),
                      str(top), "--task", "caption", "--model", str(tmp_path / "no_model_here"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "no_model" in last and "no_model_here" in last and "make model" in last


def test_ask_with_region_off_the_raster_is_refused_before_loading_a_model(tmp_path):
    raster = write_raster(tmp_path / "utm.tif", crs="EPSG:32633")
    proc = run_engine("ask", "--raster", str(raster.path), "--bbox", "0", "0", "10", "10", "--task", "caption",
                      "--model", str(tmp_path / "no_model_here"))
    assert proc.returncode == 2 and "region_off_raster" in proc.stderr


def test_info_prints_versions_and_device_as_json():
    proc = run_engine("info", "--model", "/nonexistent/model")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["device_type"] in ("cpu", "cuda") and info["versions"]["torch"]
    assert info["model"]["loaded"] is False


@pytest.mark.parametrize("params, fragment", [
    ({"task": "caption"}, "raster"),
    ({"raster": "x.tif", "task": "vqa"}, "question"),
    ({"raster": "x.tif", "task": "paint"}, "unknown task"),
    ({"raster": "x.tif", "bbox": [1, 2, 3]}, "bbox"),
    ({"raster": "x.tif", "bbox": [1, 2, 3, "4"]}, "bbox"),
    ({"raster": "x.tif", "max_tokens": 0}, "max_tokens"),
    ({"raster": 5}, "string"),
])
def test_ask_params_with_wrong_values_are_bad_requests(params, fragment):
    with pytest.raises(EngineError) as info:
        AskParams.from_dict(params)
    assert info.value.code == "bad_request" and fragment in info.value.message


def test_ask_task_alias_ask_means_vqa():
    assert AskParams.from_dict({"raster": "x.tif", "task": "ask", "question": "q?"}).task == "vqa"


def test_service_reports_missing_model_after_checking_the_raster(tmp_path):
    raster = write_raster(tmp_path / "wgs.tif", crs="EPSG:4326")
    service = EngineService(default_model=tmp_path / "none")
    left, top = raster.transform.c, raster.transform.f
    with pytest.raises(EngineError) as info:
        service.ask({"raster": str(raster.path), "bbox": [left, top - 0.005, left + 0.005, top], "task": "caption",
                     "bbox_crs": "EPSG:4326"})
    assert info.value.code == "no_model"


def test_ask_precision_must_be_a_known_name():
    assert AskParams.from_dict({"raster": "x.tif", "precision": "bf16"}).precision == "bf16"
    with pytest.raises(EngineError) as info:
        AskParams.from_dict({"raster": "x.tif", "precision": "int3"})
    assert info.value.code == "bad_request" and "precision" in info.value.message
