"""Hostile and clumsy raster sources, CRSs and regions: each one a coded EngineError, never a
traceback, and never a blocked read (FIFOs, devices, stdin) or a network fetch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from engine.errors import BAD_REQUEST, NOT_A_RASTER, RASTER_NOT_FOUND, UNKNOWN_CRS, EngineError
from engine.geo.georef import crs_to_string, parse_crs
from engine.geo.sources import MAX_PATH_CHARS, check_source
from engine.geo.window import read_chip
from geo_rasters import write_raster

UTM = Affine.translation(300000.0, 5000000.0) @ Affine.scale(10.0, -10.0)


@pytest.fixture()
def raster(tmp_path: Path):
    return write_raster(tmp_path / "r.tif")


def tiled_raster(path: Path) -> Path:
    data = np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype="uint8")
    with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=UTM, tiled=True, blockxsize=64, blockysize=64,
                       compress="deflate") as ds:
        ds.write(data)
    return path


def vrt_naming(path: Path, source: str, relative: bool = False) -> Path:
    path.write_text(f"""<VRTDataset rasterXSize="16" rasterYSize="16">
  <VRTRasterBand dataType="Byte" band="1"><SimpleSource>
    <SourceFilename relativeToVRT="{int(relative)}">{source}</SourceFilename><SourceBand>1</SourceBand>
  </SimpleSource></VRTRasterBand></VRTDataset>""")
    return path


def refused(code: str, **kwargs) -> EngineError:
    with pytest.raises(EngineError) as exc:
        read_chip(size=32, **kwargs)
    assert exc.value.code == code, exc.value.message
    return exc.value


# --------------------------------------------------------------------------- sources


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    assert "FIFO" in refused(NOT_A_RASTER, raster=fifo).message


def test_a_symbolic_link_to_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.tif").symlink_to(tmp_path / "pipe")
    refused(NOT_A_RASTER, raster=tmp_path / "link.tif")


@pytest.mark.parametrize("device", ["/dev/stdin", "/dev/zero", "/dev/null", "/vsistdin/", "/vsimem/x.tif"])
def test_devices_and_streams_are_refused(device):
    refused(NOT_A_RASTER, raster=device)


def test_a_folder_is_refused(tmp_path):
    assert "folder" in refused(NOT_A_RASTER, raster=tmp_path).message


@pytest.mark.parametrize("url", ["http://example.com/a.tif", "https://example.com/a.tif", "ftp://example.com/a.tif",
                                 "/vsicurl/http://example.com/a.tif", "/vsis3/bucket/a.tif", "/vsigs/b/a.tif",
                                 "/vsizip//vsicurl/http://example.com/a.zip/a.tif", "vrt://a.tif?bands=1"])
def test_network_sources_are_refused_unless_allowed(url, monkeypatch):
    monkeypatch.delenv("RS_LVLM_ALLOW_NETWORK", raising=False)
    assert "RS_LVLM_ALLOW_NETWORK" in refused(NOT_A_RASTER, raster=url).message


def test_network_sources_pass_the_check_when_the_user_allows_them(monkeypatch):
    monkeypatch.setenv("RS_LVLM_ALLOW_NETWORK", "1")
    assert check_source("/vsicurl/https://example.com/a.tif") == "/vsicurl/https://example.com/a.tif"


def test_a_gdal_connection_string_needs_the_user_to_allow_it(monkeypatch, tmp_path):
    monkeypatch.delenv("RS_LVLM_ALLOW_GDAL_PATHS", raising=False)
    refused(NOT_A_RASTER, raster=f'NETCDF:"{tmp_path}/a.nc":sst')


def test_a_zipped_raster_is_read_through_vsizip(tmp_path, raster):
    import zipfile

    with zipfile.ZipFile(tmp_path / "r.zip", "w") as zf:
        zf.write(raster.path, "r.tif")
    assert read_chip(f"/vsizip/{tmp_path}/r.zip/r.tif", size=32).image.shape == (32, 32, 3)


def test_a_missing_archive_is_raster_not_found(tmp_path):
    refused(RASTER_NOT_FOUND, raster=f"/vsizip/{tmp_path}/nope.zip/r.tif")


@pytest.mark.parametrize("path", ["x" * (MAX_PATH_CHARS + 1), "", "   ", "a\0b.tif"])
def test_over_long_empty_and_nul_paths_are_bad_requests(path):
    refused(BAD_REQUEST, raster=path)


def test_a_path_with_an_over_long_name_is_a_coded_error(tmp_path):
    refused(RASTER_NOT_FOUND, raster=tmp_path / ("n" * 300 + ".tif"))


@pytest.mark.parametrize("content", [b"", b"this is not an image\n", bytes(range(256)) * 40,
                                     b"II*\x00" + b"\xff" * 200, b"<VRTDataset>"])
def test_files_that_are_not_rasters_are_not_a_raster(tmp_path, content):
    p = tmp_path / "bad.tif"
    p.write_bytes(content)
    refused(NOT_A_RASTER, raster=p)


def test_corrupt_tiles_are_not_a_raster(tmp_path):
    data = bytearray(tiled_raster(tmp_path / "good.tif").read_bytes())
    n = len(data)
    data[n // 3:n // 3 + 2000] = bytes(2000)
    data[n // 2:n // 2 + 3000] = b"\xff" * 3000
    (tmp_path / "corrupt.tif").write_bytes(bytes(data))
    refused(NOT_A_RASTER, raster=tmp_path / "corrupt.tif")


def test_a_truncated_geotiff_is_not_a_raster(tmp_path):
    data = tiled_raster(tmp_path / "good.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    refused(NOT_A_RASTER, raster=tmp_path / "cut.tif")


def test_a_vrt_that_names_itself_is_refused(tmp_path):
    vrt = vrt_naming(tmp_path / "self.vrt", "self.vrt", relative=True)
    assert "itself" in refused(NOT_A_RASTER, raster=vrt).message


def test_two_vrts_naming_each_other_are_refused(tmp_path):
    vrt_naming(tmp_path / "b.vrt", "a.vrt", relative=True)
    refused(NOT_A_RASTER, raster=vrt_naming(tmp_path / "a.vrt", "b.vrt", relative=True))


@pytest.mark.parametrize("source", ["/dev/stdin", "http://example.com/a.tif", "/vsicurl/http://example.com/a.tif"])
def test_a_vrt_whose_source_is_a_device_or_the_network_is_refused(tmp_path, source, monkeypatch):
    monkeypatch.delenv("RS_LVLM_ALLOW_NETWORK", raising=False)
    refused(NOT_A_RASTER, raster=vrt_naming(tmp_path / "v.vrt", source))


def test_a_vrt_whose_source_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.tif")
    refused(NOT_A_RASTER, raster=vrt_naming(tmp_path / "v.vrt", "pipe.tif", relative=True))


def test_a_vrt_of_a_regular_file_is_read(tmp_path, raster):
    vrt = vrt_naming(tmp_path / "v.vrt", raster.path.name, relative=True)
    assert read_chip(vrt, size=16).image.shape == (16, 16, 3)


# --------------------------------------------------------------------------- CRSs


@pytest.mark.parametrize("crs", ["+proj=longlat +ellps=WGS84 +nadgrids=/etc/passwd +no_defs",
                                 "+proj=longlat +datum=WGS84 +nadgrids=http://example.com/grid.tif",
                                 "+proj=utm +zone=33 +ellps=WGS84 +geoidgrids=../../etc/shadow",
                                 "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad",
                                 "+init=/etc/passwd:4326", "EPSG:" + "9" * 40, "GEOGCS[", "x" * 70000,
                                 "EPSG:5773"])
def test_crs_text_that_names_files_urls_pipelines_or_nothing_is_a_coded_error(raster, crs):
    b = raster.feature_polygon.bounds
    refused(UNKNOWN_CRS, raster=raster.path, bbox=b, bbox_crs=crs)


def test_a_grid_named_without_a_folder_is_still_a_crs():
    assert parse_crs("+proj=longlat +ellps=WGS84 +nadgrids=@null +no_defs").is_geographic


def test_no_crs_has_no_crs_string():
    assert crs_to_string(None) is None


# --------------------------------------------------------------------------- regions and bboxes


@pytest.mark.parametrize("wkt", ["POLYGON ((0 0, 1", "not wkt at all", "POINT (300100 4999000)",
                                 "GEOMETRYCOLLECTION EMPTY", "POLYGON EMPTY", "LINESTRING (300000 4999000, 300500 4998500)",
                                 "POLYGON ((1e308 1e308, -1e308 1e308, -1e308 -1e308, 1e308 1e308))",
                                 "POLYGON ((300000 4999000, inf 4999000, 300500 4998500, 300000 4999000))",
                                 "MULTIPOLYGON (((0 0, 0 0, 0 0, 0 0)))", "POLYGON ((0 0, 1 1, 0 0))",
                                 "POLYGON Z ((300000 4999000 1, 300500 4999000 1, 300500 4998500 1, 300000 4999000 1))x"])
def test_bad_region_wkt_is_a_coded_error(raster, wkt):
    with pytest.raises(EngineError):
        read_chip(raster.path, region_wkt=wkt, size=32)


@pytest.mark.parametrize("bbox", [(float("inf"), 0, 1, 1), (float("nan"), 0, 1, 1), (1e308, 1e308, -1e308, -1e308),
                                  ("a", 0, 1, 1), (0, 0, 1), (0, 0, 0, 0), (None, 0, 1, 1)])
def test_bad_bboxes_are_coded_errors(raster, bbox):
    with pytest.raises(EngineError):
        read_chip(raster.path, bbox=bbox, size=32)


@pytest.mark.parametrize("bands", [[0], [True, 2, 3], [1, 2, 3, 4, 5], ["1"], [10 ** 30]])
def test_bad_band_selections_are_coded_errors(raster, bands):
    with pytest.raises(EngineError):
        read_chip(raster.path, bands=bands, size=32)


def test_a_raster_without_crs_is_read_in_pixel_coordinates(tmp_path):
    r = write_raster(tmp_path / "plain.tif", crs=None, transform=Affine.identity())
    chip = read_chip(r.path, bbox=(10, 10, 50, 50), size=20)
    assert chip.crs is None and crs_to_string(chip.crs) is None
