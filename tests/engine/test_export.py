"""Exports to GeoPackage, Shapefile and GeoJSON read back with fiona: CRS, attributes, long text."""
from __future__ import annotations

import json

import fiona
import pytest
import shapely
from pyproj import CRS as ProjCRS

from engine.errors import EXPORT_FAILED, UNKNOWN_CRS, EngineError
from engine.geo.export import FIELDS, read_features, sidecar_path, write_features
from engine.geo.georef import transform_geometry

LONG_ANSWER = ("The harbour holds eleven container ships moored along the eastern quay; "
               "cranes are working on three of them. ") * 6 + "Fin, déjà vu ✓."
SQUARE = "POLYGON ((300800 4999400, 301200 4999400, 301200 4999000, 300800 4999000, 300800 4999400))"


def _record(**over) -> dict:
    rec = {"wkt": SQUARE, "task": "ground", "question": "where are the ships?",
           "answer": "two ships", "label": "ship", "score": 0.87, "model": "rs-lvlm-tiny",
           "created": "2025-01-02T03:04:05+00:00"}
    rec.update(over)
    return rec


def _read(path, layer="answers"):
    kwargs = {"layer": layer} if str(path).endswith(".gpkg") else {}
    with fiona.open(path, **kwargs) as src:
        return ProjCRS.from_wkt(src.crs_wkt), [f for f in src]


@pytest.mark.parametrize("ext", ["gpkg", "shp", "geojson"])
def test_round_trip_keeps_crs(tmp_path, ext):
    path = write_features(tmp_path / f"out.{ext}", [_record()], "EPSG:32633")
    crs, _ = _read(path)
    assert crs.to_epsg() == 32633


@pytest.mark.parametrize("ext", ["gpkg", "shp", "geojson"])
def test_round_trip_keeps_attributes(tmp_path, ext):
    rec = _record()
    path = write_features(tmp_path / f"out.{ext}", [rec], "EPSG:32633")
    _, feats = _read(path)
    props = dict(feats[0]["properties"])
    assert set(props) == set(FIELDS)
    for k in ("task", "question", "answer", "label", "model", "created"):
        assert props[k] == rec[k]
    assert props["score"] == pytest.approx(0.87)
    assert len(props["uid"]) == 32


@pytest.mark.parametrize("ext", ["gpkg", "shp", "geojson"])
def test_round_trip_keeps_geometry(tmp_path, ext):
    path = write_features(tmp_path / f"out.{ext}", [_record()], "EPSG:32633")
    _, feats = _read(path)
    assert shapely.geometry.shape(feats[0]["geometry"]).equals(shapely.from_wkt(SQUARE))


@pytest.mark.parametrize("ext", ["gpkg", "geojson"])
def test_long_answer_kept_whole_in_gpkg_and_geojson(tmp_path, ext):
    path = write_features(tmp_path / f"out.{ext}", [_record(answer=LONG_ANSWER)], "EPSG:32633")
    _, feats = _read(path)
    assert feats[0]["properties"]["answer"] == LONG_ANSWER


def test_shapefile_long_answer_truncated_in_dbf_and_whole_in_sidecar(tmp_path):
    path = write_features(tmp_path / "out.shp", [_record(answer=LONG_ANSWER)], "EPSG:32633")
    _, feats = _read(path)
    short = feats[0]["properties"]["answer"]
    assert len(short.encode("utf-8")) <= 254 and short.endswith("…")
    assert LONG_ANSWER.startswith(short[:-1])
    lines = [json.loads(x) for x in sidecar_path(path).read_text(encoding="utf-8").splitlines()]
    assert lines == [{"uid": feats[0]["properties"]["uid"], "answer": LONG_ANSWER}]


def test_shapefile_long_answer_recovered_by_read_features(tmp_path):
    path = write_features(tmp_path / "out.shp", [_record(answer=LONG_ANSWER, question="q" * 300)],
                          "EPSG:32633")
    (rec,) = read_features(path)
    assert rec["answer"] == LONG_ANSWER and rec["question"] == "q" * 300


def test_shapefile_short_answer_has_no_sidecar(tmp_path):
    path = write_features(tmp_path / "out.shp", [_record()], "EPSG:32633")
    assert not sidecar_path(path).exists()


def test_shapefile_field_names_fit_dbase(tmp_path):
    path = write_features(tmp_path / "out.shp", [_record()], "EPSG:32633")
    with fiona.open(path) as src:
        names = list(src.schema["properties"])
    assert names == list(FIELDS) and all(len(n) <= 10 for n in names)


def test_gpkg_append_keeps_earlier_features(tmp_path):
    path = tmp_path / "out.gpkg"
    write_features(path, [_record(label="ship")], "EPSG:32633")
    write_features(path, [_record(label="tank"), _record(label="plane")], "EPSG:32633")
    _, feats = _read(path)
    assert [f["properties"]["label"] for f in feats] == ["ship", "tank", "plane"]


def test_gpkg_append_false_replaces_layer_only(tmp_path):
    path = tmp_path / "out.gpkg"
    write_features(path, [_record(label="ship")], "EPSG:32633", layer="detections")
    write_features(path, [_record(label="a")], "EPSG:32633")
    write_features(path, [_record(label="b")], "EPSG:32633", append=False)
    assert [f["properties"]["label"] for f in _read(path)[1]] == ["b"]
    assert [f["properties"]["label"] for f in _read(path, "detections")[1]] == ["ship"]


def test_gpkg_append_reprojects_into_layer_crs(tmp_path):
    path = tmp_path / "out.gpkg"
    write_features(path, [_record()], "EPSG:32633")
    sq4326 = transform_geometry(shapely.from_wkt(SQUARE), "EPSG:32633", "EPSG:4326", densify_pts=0)
    write_features(path, [_record(wkt=sq4326.wkt)], "EPSG:4326")
    crs, feats = _read(path)
    assert crs.to_epsg() == 32633
    second = shapely.geometry.shape(feats[1]["geometry"])
    assert second.hausdorff_distance(shapely.from_wkt(SQUARE)) < 0.01


def test_gpkg_append_promotes_to_layer_multipolygon(tmp_path):
    path = tmp_path / "out.gpkg"
    multi = shapely.MultiPolygon([shapely.from_wkt(SQUARE),
                                  shapely.box(302000, 4998000, 302100, 4998100)])
    write_features(path, [_record(wkt=multi.wkt)], "EPSG:32633")
    write_features(path, [_record()], "EPSG:32633")
    _, feats = _read(path)
    assert [f["geometry"]["type"] for f in feats] == ["MultiPolygon", "MultiPolygon"]


@pytest.mark.parametrize("ext", ["shp", "geojson"])
def test_append_to_shapefile_and_geojson_keeps_earlier_features(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    write_features(path, [_record(label="ship")], "EPSG:32633")
    write_features(path, [_record(label="tank")], "EPSG:32633")
    assert [r["label"] for r in read_features(path)] == ["ship", "tank"]


def test_shapefile_append_false_replaces_file_and_sidecar(tmp_path):
    path = tmp_path / "out.shp"
    write_features(path, [_record(answer=LONG_ANSWER)], "EPSG:32633")
    write_features(path, [_record(label="new")], "EPSG:32633", append=False)
    assert [r["label"] for r in read_features(path)] == ["new"]
    assert not sidecar_path(path).exists()


def test_geojson_written_in_requested_crs(tmp_path):
    path = write_features(tmp_path / "out.geojson", [_record()], "EPSG:32633")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert "32633" in json.dumps(doc.get("crs"))
    assert doc["features"][0]["geometry"]["coordinates"][0][0] == [300800, 4999400]


def test_missing_fields_written_empty_and_created_filled(tmp_path):
    path = write_features(tmp_path / "out.gpkg", [{"wkt": SQUARE, "answer": "x"}], "EPSG:32633")
    (rec,) = read_features(path)
    assert rec["task"] == "" and rec["score"] is None and rec["created"].startswith("20")


def test_record_without_geometry_is_written(tmp_path):
    path = write_features(tmp_path / "out.gpkg", [_record(wkt="")], "EPSG:32633")
    (rec,) = read_features(path)
    assert rec["wkt"] == "" and rec["answer"] == "two ships"


def test_unknown_extension_raises_export_failed(tmp_path):
    with pytest.raises(EngineError) as exc:
        write_features(tmp_path / "out.kml", [_record()], "EPSG:32633")
    assert exc.value.code == EXPORT_FAILED


def test_bad_wkt_raises_export_failed(tmp_path):
    with pytest.raises(EngineError) as exc:
        write_features(tmp_path / "out.gpkg", [_record(wkt="POLYGON ((0 0")], "EPSG:32633")
    assert exc.value.code == EXPORT_FAILED


def test_unknown_crs_raises(tmp_path):
    with pytest.raises(EngineError) as exc:
        write_features(tmp_path / "out.gpkg", [_record()], "EPSG:999999")
    assert exc.value.code == UNKNOWN_CRS


def test_append_to_foreign_layer_raises_export_failed(tmp_path):
    path = tmp_path / "other.gpkg"
    schema = {"geometry": "Point", "properties": {"name": "str"}}
    with fiona.open(path, "w", driver="GPKG", layer="answers", schema=schema, crs="EPSG:4326") as d:
        d.write({"geometry": {"type": "Point", "coordinates": (1, 2)}, "properties": {"name": "x"}})
    with pytest.raises(EngineError) as exc:
        write_features(path, [_record()], "EPSG:32633")
    assert exc.value.code == EXPORT_FAILED


@pytest.mark.parametrize("ext", ["gpkg", "shp"])
def test_features_of_a_raster_without_crs_are_written_without_crs(tmp_path, ext):
    path = write_features(tmp_path / f"out.{ext}", [_record(wkt="POLYGON ((0 0, 8 0, 8 8, 0 0))")], None)
    [feature] = read_features(path)
    assert feature["crs"] == "" and shapely.from_wkt(feature["wkt"]).equals(shapely.from_wkt("POLYGON ((0 0, 8 0, 8 8, 0 0))"))


def test_geojson_refuses_features_without_crs(tmp_path):
    with pytest.raises(EngineError) as exc:
        write_features(tmp_path / "out.geojson", [_record()], None)
    assert exc.value.code == EXPORT_FAILED


def test_appending_pixel_coordinates_to_a_georeferenced_layer_is_refused(tmp_path):
    path = write_features(tmp_path / "out.gpkg", [_record()], "EPSG:32633")
    with pytest.raises(EngineError) as exc:
        write_features(path, [_record()], None)
    assert exc.value.code == EXPORT_FAILED
