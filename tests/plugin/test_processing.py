"""The rs_lvlm Processing provider in a real QgsApplication: processing.run of each algorithm with
the real engine and embedded model, the Graphical Modeler, cancel, and bad input.

Each algorithm run starts its own engine subprocess (as in the toolbox), so these tests are the
slow ones of the plugin suite; the rasters are cut small with EXTENT.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature,
                       QgsGeometry, QgsProject,
                       QgsProcessingException, QgsProcessingFeedback, QgsProcessingModelAlgorithm,
                       QgsProcessingModelChildAlgorithm, QgsProcessingModelChildParameterSource,
                       QgsProcessingModelOutput, QgsProcessingModelParameter,
                       QgsProcessingParameterRasterLayer, QgsRectangle, QgsVectorLayer)

from conftest import SAMPLE_RASTER, engine_python_env, needs_engine, needs_model

sys.path.append(str(Path(QgsApplication.pkgDataPath()) / "python" / "plugins"))  # QGIS's processing plugin
import processing  # noqa: E402
from processing.core.Processing import Processing  # noqa: E402

from rs_lvlm_qgis import processing as rs_processing  # noqa: E402

TRUTH = json.loads(Path(str(SAMPLE_RASTER) + ".truth.json").read_text()) if SAMPLE_RASTER.is_file() else {}


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps the errors an algorithm reports (some QGIS versions then raise a generic message)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list = []

    def reportError(self, error, fatalError=False):  # noqa: N802,N803 (QGIS API)
        self.errors.append(error)

    def said(self, exc: Exception) -> str:
        """The exception's text and every reported error (QGIS versions raise one or the other)."""
        return "\n".join([str(exc)] + self.errors)


@pytest.fixture(scope="module")
def provider(qgis_app):
    Processing.initialize()
    registered = rs_processing.register()
    yield registered
    rs_processing.unregister(registered)


@pytest.fixture()
def engine_env(monkeypatch):
    engine_python_env(monkeypatch)


def two_by_two_scenes() -> str:
    """The sample's top-left 2 x 2 scenes as an EXTENT string (xmin,xmax,ymin,ymax [EPSG:32633])."""
    xmin, ymin, xmax, ymax = TRUTH["bounds"]
    size = TRUTH["tile"] * TRUTH["pixel_size"]
    return f"{xmin},{xmin + 2 * size},{ymax - 2 * size},{ymax} [EPSG:32633]"


def test_the_provider_offers_ask_detect_and_classify_tiles(provider):
    ids = {alg.id() for alg in provider.algorithms()}
    assert ids == {"rs_lvlm:ask", "rs_lvlm:detect", "rs_lvlm:classify_tiles"}
    assert QgsApplication.processingRegistry().algorithmById("rs_lvlm:detect") is not None


@needs_model
def test_detect_writes_one_polygon_per_object_inside_the_extent(provider, engine_env, tmp_path):
    out = processing.run("rs_lvlm:detect", {"INPUT": str(SAMPLE_RASTER), "QUESTION": "", "TILE": 256, "OVERLAP": 0,
                                            "EXTENT": two_by_two_scenes(), "OUTPUT": str(tmp_path / "det.gpkg")})
    layer = QgsVectorLayer(out["OUTPUT"], "det", "ogr")
    assert layer.isValid() and layer.featureCount() >= 1
    assert {"label", "score", "question", "model", "tile_id", "run_id"} <= set(layer.fields().names())
    assert layer.crs().authid() == "EPSG:32633"
    area = QgsGeometry.fromRect(QgsRectangle(*_extent_numbers()))
    assert all(area.intersects(f.geometry()) for f in layer.getFeatures())


def _extent_numbers():
    xmin, _, _, ymax = TRUTH["bounds"]
    size = TRUTH["tile"] * TRUTH["pixel_size"]
    return xmin, ymax - 2 * size, xmin + 2 * size, ymax


@needs_model
def test_classify_tiles_gives_a_scene_class_per_tile(provider, engine_env):
    out = processing.run("rs_lvlm:classify_tiles", {"INPUT": str(SAMPLE_RASTER), "TILE": 256,
                                                    "EXTENT": two_by_two_scenes(), "OUTPUT": "memory:"})
    labels = [f["label"] for f in out["OUTPUT"].getFeatures()]
    assert len(labels) == 4 and all(labels)


@needs_model
def test_ask_answers_each_region_feature_given_in_another_crs(provider, engine_env):
    regions = QgsVectorLayer("Polygon?crs=EPSG:3857", "regions", "memory")
    to_web = QgsCoordinateReferenceSystem("EPSG:3857")
    tr = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32633"), to_web, QgsProject.instance())
    feats = []
    for t in TRUTH["tiles"][:2]:
        left, bottom, right, top = t["bounds"]
        geom = QgsGeometry.fromRect(QgsRectangle(left, bottom, right, top))
        geom.transform(tr)
        feat = QgsFeature()
        feat.setGeometry(geom)
        feats.append(feat)
    regions.dataProvider().addFeatures(feats)
    out = processing.run("rs_lvlm:ask", {"INPUT": str(SAMPLE_RASTER), "REGIONS": regions, "TASK": 3,
                                         "QUESTION": "", "ANSWERS": "memory:", "DETECTIONS": "memory:"})
    answers = list(out["ANSWERS"].getFeatures())
    assert len(answers) == 2 and all(a["answer"] and a["task"] == "classify" for a in answers)


@needs_model
def test_detect_runs_inside_a_graphical_model(provider, engine_env):
    model = QgsProcessingModelAlgorithm("tiles then nothing", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "Raster"),
                            QgsProcessingModelParameter("raster"))
    child = QgsProcessingModelChildAlgorithm("rs_lvlm:classify_tiles")
    child.setChildId("classify")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    child.addParameterSources("TILE", [QgsProcessingModelChildParameterSource.fromStaticValue(256)])
    child.addParameterSources("EXTENT", [QgsProcessingModelChildParameterSource.fromStaticValue(two_by_two_scenes())])
    output = QgsProcessingModelOutput("tiles", "Tiles")
    output.setChildOutputName("OUTPUT")
    child.setModelOutputs({"tiles": output})
    model.addChildAlgorithm(child)
    result = processing.run(model, {"raster": str(SAMPLE_RASTER), "classify:tiles": "memory:"})
    layer = result["classify:tiles"]
    layer = layer if isinstance(layer, QgsVectorLayer) else QgsVectorLayer(layer, "tiles", "ogr")
    assert layer.featureCount() == 4


@needs_model
def test_a_cancelled_run_stops_with_a_processing_error(provider, engine_env):
    feedback = RecordingFeedback()
    feedback.cancel()
    with pytest.raises(QgsProcessingException) as err:
        processing.run("rs_lvlm:classify_tiles", {"INPUT": str(SAMPLE_RASTER), "OUTPUT": "memory:"},
                       feedback=feedback)
    assert "Cancelled" in feedback.said(err.value)


@needs_engine
def test_a_tile_smaller_than_the_model_input_is_a_clear_error(provider, engine_env):
    feedback = RecordingFeedback()
    with pytest.raises(QgsProcessingException) as err:
        processing.run("rs_lvlm:detect", {"INPUT": str(SAMPLE_RASTER), "TILE": 16, "OUTPUT": "memory:"},
                       feedback=feedback)
    assert "smaller than the model input" in feedback.said(err.value)
