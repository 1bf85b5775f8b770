"""``--ray``: the same scan on a local two-CPU Ray cluster gives the same layers as in-process.

Real embedded model, real actors (one loaded model each); skipped when Ray or the model is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from engine.data.sample_raster import write_sample_geotiff  # noqa: E402
from engine.paths import DEFAULT_MODEL_DIR  # noqa: E402
from engine.scan.runner import run_scan  # noqa: E402
from engine.scan.writer import read_layer  # noqa: E402
from engine.service import EngineService, SilentContext  # noqa: E402

pytestmark = pytest.mark.skipif(not (Path(DEFAULT_MODEL_DIR) / "config.json").is_file(),
                                reason="no embedded model (resources/model)")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("task, layer", [("ground", "detections"), ("classify", "tiles")])
def test_a_ray_scan_writes_the_same_layer_as_a_local_one(tmp_path, local_cluster, task, layer):
    raster = tmp_path / "mosaic.tif"
    write_sample_geotiff(raster, seed=3, grid=(2, 2))
    params = {"raster": str(raster), "task": task, "tile": 256, "overlap": 0, "batch": 2}
    service = EngineService()
    on_ray = run_scan({**params, "out": str(tmp_path / "ray.gpkg"), "ray": True, "ray_workers": 2},
                      SilentContext(), service)
    local = run_scan({**params, "out": str(tmp_path / "local.gpkg")}, SilentContext(), service)
    assert on_ray["run_id"] == local["run_id"] and on_ray["tiles"]["processed"] == 4
    assert read_layer(tmp_path / "ray.gpkg", layer) == read_layer(tmp_path / "local.gpkg", layer)
    assert read_layer(tmp_path / "ray.gpkg", layer), "the scan found nothing to compare"
