"""The service refuses, before any model runs, what a request cannot get, with a coded error."""
from __future__ import annotations

import pytest

from engine.errors import EngineError
from engine.service import EngineService
from geo_rasters import write_raster


@pytest.fixture()
def no_crs_raster(tmp_path):
    return write_raster(tmp_path / "plain.tif", crs=None)


@pytest.mark.parametrize("extra, fragment", [({"out_crs": "EPSG:4326"}, "out_crs"),
                                             ({"out": "answers.geojson"}, "GeoJSON")])
def test_a_raster_without_crs_refuses_reprojection_and_geojson_before_the_model(tmp_path, no_crs_raster, extra,
                                                                                fragment):
    service = EngineService(default_model=tmp_path / "no-model-here")   # the model is never reached
    params = {"raster": str(no_crs_raster.path), "bbox": [10, 10, 150, 150], "task": "caption", **extra}
    if "out" in params:
        params["out"] = str(tmp_path / params["out"])
    with pytest.raises(EngineError) as info:
        service.ask(params)
    assert info.value.code == "bad_request" and fragment in info.value.message


def test_an_unusable_model_path_in_info_is_a_coded_error():
    with pytest.raises(EngineError) as info:
        EngineService().info({"model": "/tmp/" + "x" * 300})
    assert info.value.code == "no_model"
    with pytest.raises(EngineError) as info:
        EngineService().info({"model": ["not", "a", "path"]})
    assert info.value.code == "bad_request"
