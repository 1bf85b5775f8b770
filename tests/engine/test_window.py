"""Reading model-ready chips from real GeoTIFFs in several CRSs, bit depths and band counts."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import rasterio
import shapely
from shapely import affinity
from affine import Affine
from rasterio.enums import ColorInterp
from shapely.geometry import box

from engine.errors import (
    BAD_REQUEST,
    EMPTY_REGION,
    NOT_A_RASTER,
    RASTER_NOT_FOUND,
    REGION_OFF_RASTER,
    TOO_MANY_BANDS,
    UNKNOWN_CRS,
    EngineError,
)
from engine.geo.georef import transform_geometry
from engine.geo.window import read_chip
from geo_rasters import FEATURE_PX, bright_extent, write_raster


def _bbox_around_feature(r, crs: str, margin_px: float = 30) -> tuple[float, ...]:
    """A bbox in ``crs`` covering the feature plus a margin, as a canvas in ``crs`` would draw."""
    c0, r0, c1, r1 = FEATURE_PX
    px = box(c0 - margin_px, r0 - margin_px, c1 + margin_px, r1 + margin_px)
    t = r.transform
    poly = affinity.affine_transform(px, [t.a, t.b, t.d, t.e, t.xoff, t.yoff])
    return transform_geometry(poly, r.crs, crs).bounds


def _expected_chip_box(r, chip) -> np.ndarray:
    """The feature's corners mapped into the chip's pixel grid through the chip's own affine."""
    inv = ~chip.transform
    pts = np.array([inv @ xy for xy in r.feature_polygon.exterior.coords[:-1]])
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


@pytest.mark.parametrize("raster_crs,region_crs", [
    ("EPSG:32633", "EPSG:3857"),
    ("EPSG:4326", "EPSG:3857"),
    ("EPSG:3857", "EPSG:4326"),
    ("EPSG:32633", "EPSG:32633"),
])
def test_feature_appears_where_expected_for_region_in_other_crs(tmp_path, raster_crs, region_crs):
    r = write_raster(tmp_path / "r.tif", crs=raster_crs)
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, region_crs), bbox_crs=region_crs)
    assert chip.image.shape == (224, 224, 3) and chip.image.dtype == np.uint8
    assert chip.scale < 1  # upsampled: one chip pixel is less than one source pixel
    found = np.array(bright_extent(chip.image))
    np.testing.assert_allclose(found, _expected_chip_box(r, chip), atol=1.0)


def test_chip_crs_is_the_raster_crs(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, "EPSG:3857"), bbox_crs="EPSG:3857")
    assert chip.crs.to_epsg() == 32633


def test_region_defaults_to_raster_crs(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=40)
    assert chip.source_window.col_off == 80 and chip.source_window.width == 40
    assert chip.image[..., 0].min() > 200  # the whole chip is the feature


def test_no_region_reads_whole_raster(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    chip = read_chip(r.path, size=(80, 100))
    assert chip.image.shape == (80, 100, 3)
    assert (chip.source_window.width, chip.source_window.height) == (200, 160)
    assert chip.transform @ (100, 80) == pytest.approx(r.transform @ (200, 160))


def test_reads_only_the_region_window(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs, margin_px=10))
    w = chip.source_window
    assert (w.col_off, w.row_off, w.width, w.height) == (70, 50, 60, 60)


def test_chip_transform_is_anisotropic_for_non_square_region(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    chip = read_chip(r.path, bbox=(t.c + 800, t.f - 1100, t.c + 1200, t.f - 500), size=100)
    assert chip.transform.a == pytest.approx(4.0)     # 400 m over 100 chip pixels
    assert chip.transform.e == pytest.approx(-6.0)    # 600 m over 100 chip pixels


def test_strong_aspect_distortion_warns(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    chip = read_chip(r.path, bbox=(t.c, t.f - 300, t.c + 1500, t.f), size=64)
    assert any("aspect" in w for w in chip.warnings)


def test_region_partly_off_raster_is_clipped_with_warning(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    chip = read_chip(r.path, bbox=(t.c - 500, t.f - 500, t.c + 500, t.f + 500), size=50)
    assert chip.source_window.col_off == 0 and chip.source_window.width == 50
    assert any("clipped" in w for w in chip.warnings)
    assert shapely.from_wkt(chip.region_wkt).bounds == pytest.approx((t.c, t.f - 500, t.c + 500, t.f))


def test_rotated_geotransform_feature_appears_where_expected(tmp_path):
    tf = Affine.translation(300000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    r = write_raster(tmp_path / "rot.tif", crs="EPSG:32633", transform=tf)
    region = transform_geometry(r.feature_polygon.buffer(200, join_style="mitre"),
                                "EPSG:32633", "EPSG:3857")
    chip = read_chip(r.path, region_wkt=region.wkt, region_crs="EPSG:3857")
    found = np.array(bright_extent(chip.image))
    np.testing.assert_allclose(found, _expected_chip_box(r, chip), atol=1.0)
    assert chip.transform.b != 0  # the chip is aligned with the rotated pixel grid


def test_uint16_is_percentile_stretched(tmp_path):
    r = write_raster(tmp_path / "r.tif", dtype="uint16", background=1000, feature=30000)
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs), size=64)
    c0, r0, c1, r1 = bright_extent(chip.image)
    assert chip.image[r0 + 2:r1 - 2, c0 + 2:c1 - 2].min() == 255
    assert chip.image[:3, :3].max() < 30
    assert len(chip.stretch) == 3


def test_float32_is_percentile_stretched(tmp_path):
    r = write_raster(tmp_path / "r.tif", dtype="float32", background=0.1, feature=0.9)
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs), size=64)
    c0, r0, c1, r1 = bright_extent(chip.image)
    assert chip.image[r0 + 2:r1 - 2, c0 + 2:c1 - 2].min() == 255
    assert chip.image[:3, :3].max() < 30


def test_float_nan_pixels_are_invalid(tmp_path):
    r = write_raster(tmp_path / "r.tif", dtype="float32", background=0.1, feature=0.9,
                     nodata_px=(0, 0, 200, 20), nodata=float("nan"))
    chip = read_chip(r.path, size=(160, 200))
    assert not chip.valid[:20].any() and chip.valid[25:].all()


def test_uint8_values_are_kept_unstretched(tmp_path):
    r = write_raster(tmp_path / "r.tif", feature=220)
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=20)
    assert chip.stretch is None
    assert (chip.image == 220).all()


def test_stretch_can_be_forced_on_uint8(tmp_path):
    r = write_raster(tmp_path / "r.tif", feature=220)
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs), size=64, stretch=True)
    assert chip.image.max() == 255 and chip.stretch is not None


def test_single_band_is_grey_replicated(tmp_path):
    r = write_raster(tmp_path / "r.tif", count=1)
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs), size=64)
    assert chip.image.shape == (64, 64, 3)
    assert (chip.image[..., 0] == chip.image[..., 1]).all()
    assert (chip.image[..., 1] == chip.image[..., 2]).all()
    assert chip.bands == [1]


def test_rgba_uses_rgb_and_alpha_as_mask(tmp_path):
    r = write_raster(tmp_path / "r.tif", count=4,
                     alpha_zero_px=(0, 0, 200, 40),
                     colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                                  ColorInterp.alpha])
    chip = read_chip(r.path, size=(160, 200))
    assert chip.bands == [1, 2, 3]
    assert not chip.valid[:40].any() and chip.valid[40:].all()
    assert (chip.image[:40] == 0).all()


def test_rgb_chosen_by_colour_interpretation(tmp_path):
    # Bands stored blue, green, red, near-infrared.
    r = write_raster(tmp_path / "r.tif", count=4, feature=[10, 20, 30, 40],
                     colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red,
                                  ColorInterp.undefined])
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=8)
    assert chip.bands == [3, 2, 1]
    assert tuple(chip.image[4, 4]) == (30, 20, 10)


def test_four_bands_without_colour_interpretation_use_first_three(tmp_path):
    r = write_raster(tmp_path / "r.tif", count=4, feature=[10, 20, 30, 40])
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=8)
    assert chip.bands == [1, 2, 3]
    assert tuple(chip.image[4, 4]) == (10, 20, 30)


def test_bands_argument_overrides(tmp_path):
    r = write_raster(tmp_path / "r.tif", count=4, feature=[10, 20, 30, 40])
    chip = read_chip(r.path, bbox=r.feature_polygon.bounds, size=8, bands=[4, 3, 2])
    assert tuple(chip.image[4, 4]) == (40, 30, 20)


def test_nodata_pixels_are_invalid_and_zero(tmp_path):
    r = write_raster(tmp_path / "r.tif", nodata=0, nodata_px=(0, 0, 50, 160))
    chip = read_chip(r.path, size=(160, 200))
    assert not chip.valid[:, :50].any() and chip.valid[:, 55:].all()
    assert (chip.image[:, :50] == 0).all()


def test_polygon_region_masks_outside(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    tri = shapely.Polygon([(t.c, t.f), (t.c + 2000, t.f), (t.c, t.f - 1600)])
    chip = read_chip(r.path, region_wkt=tri.wkt, size=(160, 200))
    assert chip.valid[5, 5] and not chip.valid[150, 190]
    assert (chip.image[~chip.valid] == 0).all()
    assert chip.valid.mean() == pytest.approx(0.5, abs=0.02)


def test_large_region_shrunk_beyond_ratio_warns_and_continues(tmp_path, caplog):
    r = write_raster(tmp_path / "r.tif", width=300, height=300)
    with caplog.at_level(logging.WARNING, logger="engine.geo.window"):
        chip = read_chip(r.path, size=16)
    assert chip.scale == pytest.approx(300 / 16)
    assert any("shrunk" in w for w in chip.warnings)
    assert "shrunk" in caplog.text
    assert chip.image.shape == (16, 16, 3)


def test_tiny_region_enlarged_beyond_ratio_warns(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    chip = read_chip(r.path, bbox=(t.c + 1000, t.f - 1000, t.c + 1050, t.f - 950), size=224)
    assert any("enlarged" in w for w in chip.warnings)


def test_moderate_resampling_has_no_warning(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs), size=224)
    assert chip.warnings == []


def test_missing_file_raises_raster_not_found(tmp_path):
    with pytest.raises(EngineError) as exc:
        read_chip(tmp_path / "nope.tif")
    assert exc.value.code == RASTER_NOT_FOUND


def test_text_file_raises_not_a_raster(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("this is not an image\n")
    with pytest.raises(EngineError) as exc:
        read_chip(p)
    assert exc.value.code == NOT_A_RASTER


def test_region_off_raster_raises(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=(0, 0, 1000, 1000))
    assert exc.value.code == REGION_OFF_RASTER


def test_region_in_other_crs_far_away_raises_off_raster(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=(-120, 30, -110, 40), bbox_crs="EPSG:4326")
    assert exc.value.code == REGION_OFF_RASTER


def test_zero_area_bbox_raises_empty_region(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=(t.c + 100, t.f - 500, t.c + 100, t.f - 100))
    assert exc.value.code == EMPTY_REGION


def test_line_region_raises_empty_region(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    t = r.transform
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, region_wkt=f"LINESTRING ({t.c} {t.f}, {t.c + 500} {t.f - 500})")
    assert exc.value.code == EMPTY_REGION


def test_all_nodata_region_raises_empty_region(tmp_path):
    r = write_raster(tmp_path / "r.tif", nodata=0, nodata_px=(0, 0, 100, 160))
    t = r.transform
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=(t.c, t.f - 500, t.c + 500, t.f))
    assert exc.value.code == EMPTY_REGION


@pytest.mark.parametrize("crs", ["EPSG:999999", "not a crs", ""])
def test_unknown_crs_raises(tmp_path, crs):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=r.feature_polygon.bounds, bbox_crs=crs)
    assert exc.value.code == UNKNOWN_CRS


@pytest.mark.parametrize("bands", [[4], [1, 2, 3, 1], [0], [1, 2]])
def test_invalid_band_selection_raises_too_many_bands(tmp_path, bands):
    r = write_raster(tmp_path / "r.tif", count=3)
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bands=bands)
    assert exc.value.code == TOO_MANY_BANDS


def test_bad_wkt_raises_bad_request(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, region_wkt="POLYGON ((0 0, 1")
    assert exc.value.code == BAD_REQUEST


def test_palette_band_is_expanded_through_colour_table(tmp_path):
    r = write_raster(tmp_path / "r.tif", count=1, background=1, feature=2)
    with rasterio.open(r.path, "r+") as ds:
        ds.write(np.where(ds.read(1) == 2, 2, 1).astype("uint8"), 1)
        ds.write_colormap(1, {1: (0, 0, 255, 255), 2: (255, 0, 0, 255)})
    chip = read_chip(r.path, bbox=_bbox_around_feature(r, r.crs, margin_px=10), size=60)
    assert tuple(chip.image[30, 30]) == (255, 0, 0)
    assert tuple(chip.image[0, 0]) == (0, 0, 255)


def test_non_georeferenced_raster_uses_pixel_coordinates(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs=None, transform=Affine.identity())
    chip = read_chip(r.path, bbox=(80, 60, 120, 100), size=40)
    assert chip.crs is None and chip.image[..., 0].min() > 200
    assert any("not georeferenced" in w for w in chip.warnings)


def test_region_crs_on_raster_without_crs_raises(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs=None, transform=Affine.identity())
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, bbox=(80, 60, 120, 100), bbox_crs="EPSG:4326")
    assert exc.value.code == UNKNOWN_CRS


# --------------------------------------------------------------------------- hostile regions


ANTIMERIDIAN = Affine.translation(179.99, -16.0) @ Affine.scale(1e-4, -1e-4)  # lon 179.99..180.01


def test_bbox_crossing_the_antimeridian_reads_the_area_between_not_the_complement(tmp_path):
    # the bright feature spans lon 179.998..180.002: across the antimeridian
    r = write_raster(tmp_path / "fiji.tif", crs="EPSG:4326", transform=ANTIMERIDIAN)
    chip = read_chip(r.path, bbox=(179.996, -16.0110, -179.996, -16.0050), size=80)
    c0, r0, c1, r1 = bright_extent(chip.image)
    assert chip.bounds[0] == pytest.approx(179.996, abs=2e-4)
    assert chip.bounds[2] == pytest.approx(180.004, abs=2e-4)
    assert (c1 - c0) > 30 and chip.warnings == []


def test_antimeridian_bbox_over_a_global_raster_reads_both_edges_and_masks_the_rest(tmp_path):
    world = Affine.translation(-180.0, 10.0) @ Affine.scale(1.8, -0.1)   # 200 x 160 px, lon -180..180
    r = write_raster(tmp_path / "world.tif", crs="EPSG:4326", transform=world, feature_px=(0, 60, 10, 100))
    chip = read_chip(r.path, bbox=(162.0, 0.0, -162.0, 5.0), size=100)
    assert chip.valid[:, :4].all() and chip.valid[:, -4:].all() and not chip.valid[:, 10:90].any()
    assert any("antimeridian" in w for w in chip.warnings)


def test_self_intersecting_polygon_is_repaired_before_the_zero_area_check(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    x0, y1 = r.transform.c + 500, r.transform.f - 500
    bowtie = f"POLYGON (({x0} {y1}, {x0 + 400} {y1 - 400}, {x0 + 400} {y1}, {x0} {y1 - 400}, {x0} {y1}))"
    chip = read_chip(r.path, region_wkt=bowtie, size=40)
    assert chip.valid.any() and not chip.valid.all()


def test_empty_region_wkt_is_an_error_not_the_whole_raster(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, region_wkt="  ")
    assert exc.value.code == BAD_REQUEST and "empty" in exc.value.message


@pytest.mark.parametrize("coord", ["inf", "-inf", "nan"])
def test_region_wkt_with_non_finite_coordinates_is_a_bad_request(tmp_path, coord):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, region_wkt=f"POLYGON ((300000 4999000, {coord} 4999000, 300500 4998500, 300000 4999000))")
    assert exc.value.code == BAD_REQUEST


def test_raster_without_crs_answers_in_pixel_coordinates_with_a_polygon_region(tmp_path):
    r = write_raster(tmp_path / "r.tif", crs=None, transform=Affine.identity())
    chip = read_chip(r.path, region_wkt="POLYGON ((70 50, 130 50, 130 110, 70 110, 70 50))", size=60)
    assert chip.crs is None and chip.bounds == (70.0, 50.0, 130.0, 110.0)


def test_an_absurd_chip_size_is_refused_before_anything_is_read(tmp_path):
    r = write_raster(tmp_path / "r.tif")
    with pytest.raises(EngineError) as exc:
        read_chip(r.path, size=96000)
    assert exc.value.code == BAD_REQUEST and "96000" in exc.value.message
