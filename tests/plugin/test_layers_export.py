"""Result layers (answers, detections) and their export to Shapefile / GeoPackage."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import UTM_ORIGIN
from osgeo import ogr, osr
from qgis.core import QgsProject

from rs_lvlm_qgis import export, result_layers

X0, Y1 = UTM_ORIGIN


def _box_wkt(x1: float, y1: float, x2: float, y2: float) -> str:
    return f"POLYGON (({x1} {y1}, {x2} {y1}, {x2} {y2}, {x1} {y2}, {x1} {y1}))"


def engine_style_result() -> dict:
    """A result shaped like the engine's ``ask`` reply (EPSG:32633 coordinates)."""
    return {
        "task": "ground", "question": "storage tanks", "text": "two storage tanks",
        "boxes": [
            {"label": "storage tank", "score": 0.91, "bbox_pixel": [10, 10, 30, 30],
             "wkt": _box_wkt(X0 + 10, Y1 - 30, X0 + 30, Y1 - 10)},
            {"label": "storage tank", "score": 0.55, "bbox_pixel": [50, 60, 70, 90],
             "wkt": _box_wkt(X0 + 50, Y1 - 90, X0 + 70, Y1 - 60)},
        ],
        "crs": "EPSG:32633",
        "extent": {"wkt": _box_wkt(X0, Y1 - 128, X0 + 128, Y1), "bounds": [X0, Y1 - 128, X0 + 128, Y1]},
        "retrieved": [{"level": "object", "entry": "storage tank: a cylindrical tank", "score": 0.8}],
        "timing": {"total_s": 0.5}, "model": "rs-lvlm-test",
    }


@pytest.fixture()
def layers(project):
    return result_layers.add_result(engine_style_result(), "storage tanks", "ground",
                                    raster="/data/scene_utm33n.tif")


def test_answer_and_detections_layers_are_created_in_result_crs_inside_group(layers, project):
    answers, detections = layers["answers"], layers["detections"]
    assert answers.name() == "RS-LVLM answers" and detections.name() == "RS-LVLM detections"
    assert answers.crs().authid() == "EPSG:32633" == detections.crs().authid()
    group = project.layerTreeRoot().findGroup("RS-LVLM")
    assert group is not None
    assert {node.layer() for node in group.findLayers()} == {answers, detections}
    assert answers.labelsEnabled() and detections.labelsEnabled()
    feature = next(answers.getFeatures())
    assert feature["task"] == "ground" and feature["answer"] == "two storage tanks"
    assert feature["model"] == "rs-lvlm-test" and feature["created"]
    assert [f["label"] for f in detections.getFeatures()] == ["storage tank"] * 2


def test_each_answer_appends_to_the_same_layers(layers):
    again = result_layers.add_result(engine_style_result(), "tanks again", "ground")
    assert again["answers"] is layers["answers"]
    assert layers["answers"].featureCount() == 2
    assert layers["detections"].featureCount() == 4


def _read_back(path: Path, layer_name: str = None):
    ds = ogr.Open(str(path))
    assert ds is not None, path
    layer = ds.GetLayerByName(layer_name) if layer_name else ds.GetLayer(0)
    srs = layer.GetSpatialRef()
    rows = []
    for feature in layer:
        rows.append(({k: feature.GetField(k) for k in feature.keys()},
                     feature.GetGeometryRef().ExportToWkt()))
    return srs, rows, ds


def _expected_srs():
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    return srs


@pytest.mark.parametrize("suffix", [".shp", ".gpkg"])
def test_export_writes_file_that_ogr_reads_back_with_same_features(layers, tmp_path, suffix):
    for kind in ("answers", "detections"):
        layer = layers[kind]
        written = export.export_layer(layer, str(tmp_path / f"{kind}{suffix}"))
        srs, rows, _ds = _read_back(Path(written))
        assert srs is not None and srs.IsSame(_expected_srs())
        assert len(rows) == layer.featureCount()
        originals = sorted(layer.getFeatures(), key=lambda f: f.id())
        for original, (attributes, wkt) in zip(originals, rows):
            for field in layer.fields().names():
                expected = original[field]
                if isinstance(expected, float):
                    assert attributes[field] == pytest.approx(expected)
                else:
                    assert attributes[field] == expected, field
            geometry = ogr.CreateGeometryFromWkt(wkt)
            reference = ogr.CreateGeometryFromWkt(original.geometry().asWkt())
            assert geometry.SymmetricDifference(reference).GetArea() < 1e-6


def test_dock_export_button_writes_geopackage(offline_dock, layers, tmp_path):
    path = offline_dock.export("detections", str(tmp_path / "boxes.gpkg"))
    assert path and Path(path).is_file()
    assert "Exported" in offline_dock.statusLabel.text()


def test_export_to_unknown_format_shows_message(offline_dock, layers, tmp_path):
    assert offline_dock.export("answers", str(tmp_path / "answers.xyz")) is None
    assert "Unsupported file type" in offline_dock.statusLabel.text()


def test_result_layers_never_touch_other_project_layers(layers, project):
    names = sorted(layer.name() for layer in QgsProject.instance().mapLayers().values())
    assert names == ["RS-LVLM answers", "RS-LVLM detections"]


# ---------------------------------------------------------------- export defaults (issue 14)
def test_default_export_name_is_the_raster_name_and_the_time():
    from datetime import datetime

    when = datetime(2026, 12, 1, 23, 37)
    assert export.default_file_name("/data/scene utm33n.tif", "answers", when) == \
        "scene_utm33n_answers_20261201-2337.gpkg"
    assert export.default_file_name("", "detections", when, ".shp") == \
        "rs_lvlm_detections_20261201-2337.shp"


def test_dock_proposes_the_asked_rasters_name_in_the_project_folder(offline_dock, utm_raster,
                                                                    project, tmp_path):
    project.write(str(tmp_path / "survey.qgz"))
    proposed = Path(offline_dock.exports.default_path("detections"))
    assert proposed.parent == tmp_path
    assert proposed.name.startswith("scene_detections_") and proposed.suffix == ".gpkg"


def test_exported_file_is_added_to_the_map(offline_dock, layers, tmp_path, project):
    written = offline_dock.export("detections", str(tmp_path / "boxes.gpkg"))
    added = [layer for layer in project.mapLayers().values()
             if layer.providerType() == "ogr" and layer.source().startswith(written)]
    assert len(added) == 1 and added[0].featureCount() == 2


def test_keep_in_project_stores_result_layers_in_the_project_geopackage(offline_dock, layers,
                                                                       project, tmp_path):
    project.write(str(tmp_path / "survey.qgz"))
    offline_dock.exports.persistCheck.setChecked(True)
    try:
        answers = result_layers.find_layer(result_layers.ANSWERS_LAYER)
        assert answers.providerType() == "ogr"
        assert answers.source().startswith(str(tmp_path / "survey_rs_lvlm_epsg_32633.gpkg"))
        result_layers.add_result(engine_style_result(), "again", "ground", raster="/x.tif")
        stored = result_layers.find_layer(result_layers.DETECTIONS_LAYER)
        assert stored.source().endswith("survey_rs_lvlm_epsg_32633.gpkg|layername=rs_lvlm_detections")
        rasters = [feature["raster"] for feature in stored.getFeatures()]
        assert len(rasters) == 4  # later answers are appended to the file
        assert rasters[-2:] == ["/x.tif", "/x.tif"]
    finally:
        offline_dock.exports.persistCheck.setChecked(False)
