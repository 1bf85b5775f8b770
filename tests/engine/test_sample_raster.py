"""Sample GeoTIFF: real CRS, tiled + compressed RGB, and truth boxes that land on the right pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

from engine.data.sample_raster import MAX_SIZE_BYTES, write_sample_geotiff
from engine.data.scene_generator import generate_scene

SHIPPED = Path(__file__).resolve().parents[2] / "resources" / "sample" / "sample_utm33n.tif"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("raster") / "mosaic.tif"
    truth = write_sample_geotiff(path, seed=3, grid=(2, 3), tile=128, origin=(400000.0, 5000000.0),
                                 pixel_size=2.0)
    return path, truth


def test_geotiff_has_crs_transform_tiling_and_rgb(small):
    path, truth = small
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32633
        assert (ds.width, ds.height, ds.count) == (384, 256, 3)
        assert ds.transform.a == 2.0 and ds.transform.e == -2.0
        assert (ds.transform.c, ds.transform.f) == (400000.0, 5000000.0)
        assert ds.profile["tiled"] and ds.compression.name == "deflate"
        assert ds.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        assert ds.dtypes == ("uint8",) * 3
    assert json.loads(Path(str(path) + ".truth.json").read_text()) == json.loads(json.dumps(truth))
    assert len({t["scene_class"] for t in truth["tiles"]}) == 6


def test_truth_boxes_land_on_the_objects_pixels(small):
    path, truth = small
    with rasterio.open(path) as ds:
        mosaic = np.transpose(ds.read(), (1, 2, 0))
        inv = ~ds.transform
    for t in truth["tiles"]:
        x0, y0, w, h = t["pixel_window"]
        scene = generate_scene(np.random.default_rng(t["seed"]), t["scene_class"], w)
        assert np.array_equal(mosaic[y0:y0 + h, x0:x0 + w], scene.image)
        left, bottom, right, top = t["bounds"]
        assert inv @ (left, top) == pytest.approx((x0, y0))
        for i, o in enumerate(t["objects"]):
            mx1, my1, mx2, my2 = o["bbox_map"]
            px1, py1 = inv @ (mx1, my2)
            px2, py2 = inv @ (mx2, my1)
            assert (px1, py1, px2, py2) == pytest.approx(o["bbox_pixel"], abs=0.01)
            ys, xs = np.nonzero(scene.instances == i + 1)
            # the pixels painted for object i are the ones its map box covers
            assert x0 + xs.min() + 1 >= px1 and x0 + xs.max() <= px2
            assert y0 + ys.min() + 1 >= py1 and y0 + ys.max() <= py2
            assert x0 + xs.min() <= px1 + 1 and y0 + ys.max() + 1 >= py2 - 1
            assert left <= mx1 < mx2 <= right and bottom <= my1 < my2 <= top


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped sample not generated")
def test_shipped_sample_is_small_and_in_utm33n():
    assert SHIPPED.stat().st_size < MAX_SIZE_BYTES
    with rasterio.open(SHIPPED) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.count == 3
    truth = json.loads(Path(str(SHIPPED) + ".truth.json").read_text())
    assert len(truth["tiles"]) == 9 and all(t["objects"] for t in truth["tiles"])
