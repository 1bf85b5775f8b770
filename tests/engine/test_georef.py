"""Boxes on a chip become polygons on the ground, exactly, in the raster CRS and any other."""
from __future__ import annotations

import math

import numpy as np
import pytest
from shapely import affinity
from affine import Affine
from pyproj import CRS as ProjCRS
from shapely.geometry import Polygon, box

from engine.errors import UNKNOWN_CRS, EngineError
from engine.geo.georef import (
    box_corners,
    chip_box_to_raster_pixels,
    chip_boxes_to_polygons,
    crs_to_string,
    grid_boxes_to_polygons,
    region_polygon,
    transform_geometry,
)
from engine.geo.window import read_chip
from engine.grounding import GridBox, pixels_to_grid
from geo_rasters import FEATURE_PX, bright_extent, write_raster

SOURCE_PIXEL = {"EPSG:32633": 10.0, "EPSG:3857": 10.0, "EPSG:4326": 1e-4}


def _region_bbox(r, crs: str, margin_px: float = 30) -> tuple[float, ...]:
    c0, r0, c1, r1 = FEATURE_PX
    t = r.transform
    px = box(c0 - margin_px, r0 - margin_px, c1 + margin_px, r1 + margin_px)
    poly = affinity.affine_transform(px, [t.a, t.b, t.d, t.e, t.xoff, t.yoff])
    return transform_geometry(poly, r.crs, crs).bounds


def _chip_over_feature(tmp_path, raster_crs: str, region_crs: str):
    r = write_raster(tmp_path / "r.tif", crs=raster_crs)
    return r, read_chip(r.path, bbox=_region_bbox(r, region_crs), bbox_crs=region_crs)


@pytest.mark.parametrize("raster_crs", ["EPSG:32633", "EPSG:3857", "EPSG:4326"])
def test_box_around_seen_feature_lands_on_feature_in_raster_crs(tmp_path, raster_crs):
    r, chip = _chip_over_feature(tmp_path, raster_crs, "EPSG:3857")
    x1, y1, x2, y2 = bright_extent(chip.image)  # the box a perfect detector would draw
    (poly,) = chip_boxes_to_polygons([(x1, y1, x2, y2, 0)], chip)
    # Sub-pixel: within half a source pixel of the feature's true outline.
    assert poly.hausdorff_distance(r.feature_polygon) < 0.5 * SOURCE_PIXEL[raster_crs]


@pytest.mark.parametrize("raster_crs", ["EPSG:32633", "EPSG:3857"])
def test_box_around_seen_feature_lands_on_feature_in_4326(tmp_path, raster_crs):
    r, chip = _chip_over_feature(tmp_path, raster_crs, "EPSG:3857")
    x1, y1, x2, y2 = bright_extent(chip.image)
    (poly,) = chip_boxes_to_polygons([(x1, y1, x2, y2, 0)], chip, out_crs="EPSG:4326")
    expected = r.feature_polygon_in("EPSG:4326")
    # Half a 10 m pixel is under 5e-5 degrees of latitude and 6.4e-5 of longitude at 45 N.
    assert poly.hausdorff_distance(expected) < 6.4e-5


def test_exact_chip_box_maps_to_exact_corners(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:3857")
    inv = ~chip.transform
    corners = [inv @ xy for xy in r.feature_polygon.exterior.coords[:-1]]
    xs, ys = zip(*corners)
    (poly,) = chip_boxes_to_polygons([(min(xs), min(ys), max(xs), max(ys))], chip)
    assert poly.hausdorff_distance(r.feature_polygon) < 1e-6


def test_exact_chip_box_reprojected_matches_pyproj_corners(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:3857")
    inv = ~chip.transform
    xs, ys = zip(*[inv @ xy for xy in r.feature_polygon.exterior.coords[:-1]])
    (poly,) = chip_boxes_to_polygons([(min(xs), min(ys), max(xs), max(ys))], chip,
                                     out_crs="EPSG:4326")
    assert poly.hausdorff_distance(r.feature_polygon_in("EPSG:4326")) < 1e-9


def test_grid_boxes_land_on_feature(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:32633")
    gb = pixels_to_grid(*bright_extent(chip.image), 0.0, chip.width, chip.height, label="tank")
    (poly,) = grid_boxes_to_polygons([gb], chip)
    # The 0-100 grid quantises to 1 % of the chip (here ~1.6 source pixels): half a cell + 0.5 px.
    cell = chip.scale * chip.width / 100 * 10.0
    assert poly.hausdorff_distance(r.feature_polygon) < 0.5 * cell + 5.0


def test_grid_box_full_grid_is_chip_extent(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:32633")
    (poly,) = grid_boxes_to_polygons([GridBox(0, 0, 100, 100)], chip)
    assert poly.bounds == pytest.approx(chip.bounds)


def test_rotated_box_corners_rotate_clockwise_in_image_space():
    # A 4x2 box centred on (2, 1) turned 90 degrees clockwise on screen (y down) stands upright.
    pts = box_corners(0, 0, 4, 2, 90)
    np.testing.assert_allclose(pts, [(3, -1), (3, 3), (1, 3), (1, -1)], atol=1e-12)


def test_rotated_box_polygon_vertices_go_through_chip_affine(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:3857")
    (poly,) = chip_boxes_to_polygons([(50, 60, 150, 100, 30)], chip)
    t = math.radians(30)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    local = np.array([(-50, -20), (50, -20), (50, 20), (-50, 20)]) @ rot.T + (100, 80)
    expected = Polygon([chip.transform @ tuple(p) for p in local])
    assert poly.hausdorff_distance(expected) < 1e-6
    a, b, d, e = chip.transform.a, chip.transform.b, chip.transform.d, chip.transform.e
    assert poly.area == pytest.approx(100 * 40 * abs(a * e - b * d))


def test_polygons_are_counter_clockwise(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:32633")
    (poly,) = chip_boxes_to_polygons([(10, 10, 50, 40, 15)], chip)
    assert poly.exterior.is_ccw


def test_rotated_geotransform_box_lands_on_feature(tmp_path):
    tf = Affine.translation(300000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    r = write_raster(tmp_path / "rot.tif", crs="EPSG:32633", transform=tf)
    region = r.feature_polygon.buffer(300, join_style="mitre")
    chip = read_chip(r.path, region_wkt=region.wkt)
    (poly,) = chip_boxes_to_polygons([bright_extent(chip.image)], chip)
    assert poly.hausdorff_distance(r.feature_polygon) < 5.0


def test_region_polygon_in_raster_and_other_crs(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    t = r.transform
    square = box(t.c + 500, t.f - 900, t.c + 900, t.f - 500)
    chip = read_chip(r.path, region_wkt=square.wkt, size=64)
    assert region_polygon(chip).equals(square)
    in_4326 = region_polygon(chip, out_crs="EPSG:4326")
    assert in_4326.hausdorff_distance(transform_geometry(square, "EPSG:32633", "EPSG:4326")) < 1e-9
    assert len(in_4326.exterior.coords) > 5  # densified edges


def test_chip_box_to_raster_pixels(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=80)  # 40 px -> 80 px
    assert chip_box_to_raster_pixels((0, 0, 80, 80, 0), chip) == pytest.approx(FEATURE_PX)


@pytest.mark.parametrize("given,expected", [
    ("EPSG:32633", "EPSG:32633"),
    ("epsg:4326", "EPSG:4326"),
    (ProjCRS.from_epsg(3857), "EPSG:3857"),
])
def test_crs_to_string_uses_epsg_code(given, expected):
    assert crs_to_string(given) == expected


def test_crs_to_string_falls_back_to_wkt():
    custom = "+proj=tmerc +lat_0=0 +lon_0=13.37 +k=1 +x_0=0 +y_0=0 +ellps=GRS80 +units=m"
    text = crs_to_string(custom)
    assert text.startswith(("PROJCS", "PROJCRS")) and "13.37" in text


def test_unknown_out_crs_raises(tmp_path):
    r, chip = _chip_over_feature(tmp_path, "EPSG:32633", "EPSG:32633")
    with pytest.raises(EngineError) as exc:
        chip_boxes_to_polygons([(0, 0, 10, 10)], chip, out_crs="EPSG:0")
    assert exc.value.code == UNKNOWN_CRS
