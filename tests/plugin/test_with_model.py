"""Draw, ask and get layers through the real engine and the embedded model.

These run once a trained checkpoint exists (resources/model/config.json); until then they are
skipped (the no-model path is covered in test_engine_client.py).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import MODEL_DIR, SAMPLE_RASTER, finished, make_geotiff, needs_model, wait_until
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
)
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from rs_lvlm_qgis import result_layers, settings
from rs_lvlm_qgis.answer_text import readable_answer

pytestmark = needs_model

FALLBACK_QUESTIONS = ("", "Locate all buildings.", "Locate all vehicles.", "Locate all storage tanks.")


@pytest.fixture(autouse=True)
def model_setting():
    """Ask with the tested checkpoint explicitly (the plugin's model-folder setting)."""
    QgsSettings().setValue(settings.KEY_MODEL_DIR, str(MODEL_DIR))
    QgsSettings().setValue(settings.KEY_MAX_TOKENS, 96)  # enough for a caption or a few boxes
    yield
    QgsSettings().remove(settings.KEY_MODEL_DIR)
    QgsSettings().remove(settings.KEY_MAX_TOKENS)


@pytest.fixture()
def scene(tmp_path: Path, project) -> QgsRasterLayer:
    """A copy of the sample GeoTIFF (QGIS writes .aux.xml next to what it opens), or a
    generated one until the sample exists, added to the project."""
    if SAMPLE_RASTER.is_file():
        for src in SAMPLE_RASTER.parent.glob(SAMPLE_RASTER.name + "*"):
            if not src.name.endswith(".aux.xml"):
                shutil.copy2(src, tmp_path / src.name)
        path = tmp_path / SAMPLE_RASTER.name
    else:
        path = make_geotiff(tmp_path / "scene.tif")
    layer = QgsRasterLayer(str(path), "sample")
    assert layer.isValid()
    project.addMapLayer(layer)
    return layer


def target(raster: QgsRasterLayer) -> Tuple[QgsRectangle, List[str]]:
    """Where to ask and what to ground: the sample's scene tile with the most objects (from its
    truth file; the model answers at tile scale) and its commonest object class; without a
    truth file, the central 80 % of the raster and generic questions."""
    truth = Path(raster.source() + ".truth.json")
    if truth.is_file():
        tiles = json.loads(truth.read_text(encoding="utf-8")).get("tiles") or []
        tiles = [t for t in tiles if t.get("objects")]
        if tiles:
            tile = max(tiles, key=lambda t: len(t["objects"]))
            classes = Counter(o["cls"] for o in tile["objects"]).most_common()
            x0, y0, x1, y1 = tile["bounds"]
            rect = QgsRectangle(x0, y0, x1, y1)
            rect.scale(0.95)
            return rect, [f"Locate all {cls}s." for cls, _ in classes[:2]] + list(FALLBACK_QUESTIONS)
    rect = QgsRectangle(raster.extent())
    rect.scale(0.8)
    return rect, list(FALLBACK_QUESTIONS)


def _draw_rectangle(dock, canvas, raster, project_crs: str) -> QgsRectangle:
    """Show the raster in the project CRS and drag a rectangle over the target region;
    returns the drawn rectangle in the project CRS."""
    crs = QgsCoordinateReferenceSystem(project_crs)
    QgsProject.instance().setCrs(crs)
    canvas.setDestinationCrs(crs)
    to_map = QgsCoordinateTransform(raster.crs(), crs, QgsProject.instance())
    canvas.setExtent(to_map.transformBoundingBox(raster.extent()))
    canvas.refresh()
    wait_until(lambda: False, 0.2)
    inner = to_map.transformBoundingBox(target(raster)[0])
    dock.regionCombo.setCurrentIndex(dock.regionCombo.findData("rectangle"))
    transform = canvas.getCoordinateTransform()
    a = transform.transform(QgsPointXY(inner.xMinimum(), inner.yMaximum()))
    b = transform.transform(QgsPointXY(inner.xMaximum(), inner.yMinimum()))
    start, end = QPoint(round(a.x()), round(a.y())), QPoint(round(b.x()), round(b.y()))
    QTest.mousePress(canvas.viewport(), Qt.LeftButton, Qt.NoModifier, start)
    QTest.mouseMove(canvas.viewport(), (start + end) / 2)
    QTest.mouseMove(canvas.viewport(), end)
    QTest.mouseRelease(canvas.viewport(), Qt.LeftButton, Qt.NoModifier, end)
    assert dock.region is not None
    return dock.region.geometry.boundingBox()


def _ask(dock, task: str, question: str = ""):
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData(task))
    dock.questionEdit.setCurrentText(question)
    req = dock.ask()
    assert req is not None, dock.statusLabel.text()
    return finished(req, 300)


def _first_grounded(dock, scene) -> dict:
    """The first ground answer with boxes among the target's questions (bounded: each try is a
    full generation)."""
    for question in target(scene)[1][:3]:
        req = _ask(dock, "ground", question)
        assert req.error is None, req.error
        if req.result["boxes"]:
            return req.result
    raise AssertionError("the model grounded nothing on the sample scene")


def test_caption_answer_adds_feature_with_drawn_region_and_answer(dock, scene, shown_canvas):
    drawn = _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    req = _ask(dock, "caption")
    assert req.error is None, req.error
    text = readable_answer(req.result)
    assert text.strip()
    layer = result_layers.find_layer(result_layers.ANSWERS_LAYER)
    assert layer is not None and layer.featureCount() == 1
    feature = next(layer.getFeatures())
    assert feature["answer"] == text[:254] and feature["task"] == "caption"
    overlap = feature.geometry().intersection(QgsGeometry.fromRect(drawn)).area()
    assert overlap / drawn.area() > 0.95
    assert dock.answerView.toPlainText() == text
    assert dock.retrievedList.topLevelItemCount() == len(req.result.get("retrieved") or [])


def test_answer_region_is_stored_in_raster_crs_when_project_is_web_mercator(
        dock, scene, shown_canvas):
    drawn = _draw_rectangle(dock, shown_canvas, scene, "EPSG:3857")
    req = _ask(dock, "classify")
    assert req.error is None, req.error
    layer = result_layers.find_layer(result_layers.ANSWERS_LAYER)
    assert layer.crs() == scene.crs() != QgsProject.instance().crs()
    to_raster = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:3857"), scene.crs(),
                                       QgsProject.instance())
    expected = QgsGeometry.fromRect(drawn)
    expected.transform(to_raster)
    stored = next(layer.getFeatures()).geometry()
    assert stored.intersection(expected).area() / stored.combine(expected).area() > 0.9


def test_answer_tokens_stream_into_answer_view_before_result(dock, scene, shown_canvas):
    _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData("vqa"))
    dock.questionEdit.setCurrentText("What kind of scene is this?")
    req = dock.ask()
    snapshots = []
    req.token.connect(lambda _t: snapshots.append(dock.answerView.toPlainText()))
    finished(req, 300)
    assert req.error is None, req.error
    assert snapshots and all(snapshots)  # the view showed text while tokens arrived


def test_grounding_boxes_lie_inside_drawn_region_in_raster_crs_with_web_mercator_project(
        dock, scene, shown_canvas):
    drawn = _draw_rectangle(dock, shown_canvas, scene, "EPSG:3857")
    to_raster = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:3857"), scene.crs(),
                                       QgsProject.instance())
    region_in_raster = to_raster.transformBoundingBox(drawn)
    region_in_raster.grow(2 * scene.rasterUnitsPerPixelX())
    result = _first_grounded(dock, scene)
    detections = result_layers.find_layer(result_layers.DETECTIONS_LAYER)
    assert detections is not None
    assert detections.crs() == scene.crs() != QgsProject.instance().crs()
    features = list(detections.getFeatures())
    assert len(features) >= len(result["boxes"])
    for feature in features[-len(result["boxes"]):]:
        assert region_in_raster.contains(feature.geometry().boundingBox()), \
            feature.geometry().asWkt()
        assert feature["label"]


def test_grounded_answer_reads_as_text_with_the_raw_output_kept_real_engine(dock, scene, shown_canvas):
    _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    result = _first_grounded(dock, scene)
    assert "{<" in result["raw"] and "{<" not in result["text"]
    assert "{<" not in dock.answerView.toPlainText() and dock.answerView.toPlainText().strip()
    answers = result_layers.find_layer(result_layers.ANSWERS_LAYER)
    feature = list(answers.getFeatures())[-1]
    assert "{<" not in feature["answer"] and feature["raw"] == result["raw"][:254]


def test_follow_up_question_reaches_the_real_engine_with_its_history(dock, scene, shown_canvas):
    _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    first = _ask(dock, "vqa", "How many airplanes are there?")
    assert first.error is None, first.error
    follow_up = _ask(dock, "vqa", "and how many are white?")
    assert follow_up.error is None, follow_up.error
    assert [t["question"] for t in follow_up.params["history"]] == ["How many airplanes are there?"]
    assert follow_up.result["history_turns"] == 1 and follow_up.result["text"].strip()


def test_cancel_during_generation_stops_it(dock, scene, shown_canvas):
    _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData("caption"))
    req = dock.ask()
    tokens = []

    def on_token(text: str) -> None:
        tokens.append(text)
        if len(tokens) == 1:
            dock.cancelButton.click()

    req.token.connect(on_token)
    finished(req, 300)
    if req.error is None:
        pytest.skip("the model finished its answer before the cancel reached the engine")
    assert req.error[0] == "cancelled"
    assert dock.statusLabel.text() == "Cancelled."
    assert not dock.cancelButton.isEnabled()


def test_cancel_button_right_after_ask_cancels(dock, scene, shown_canvas):
    _draw_rectangle(dock, shown_canvas, scene, "EPSG:32633")
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData("caption"))
    req = dock.ask()
    dock.cancelButton.click()
    finished(req, 300)
    assert req.error is not None and req.error[0] == "cancelled"
    assert dock.statusLabel.text() == "Cancelled."

