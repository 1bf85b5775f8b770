"""The analyst's view of an answer (issue 14): readable text, warnings, boxes, follow-ups,
result actions.  The dock talks over the real protocol to a real subprocess, a stand-in engine
(fake_engine.py) whose answers are known exactly."""
from __future__ import annotations

import sys

import pytest
from conftest import UTM_ORIGIN, finished, wait_until
from fake_engine import sent_requests, write_fake_engine
from qgis.core import Qgis, QgsFeature, QgsGeometry, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest

from rs_lvlm_qgis import protocol, region, result_layers
from rs_lvlm_qgis.engine_client import EngineClient

X0, Y1 = UTM_ORIGIN


@pytest.fixture()
def fake_root(tmp_path):
    return write_fake_engine(tmp_path / "fake")


@pytest.fixture()
def fake_dock(qgis_iface, project, fake_root):
    """The dock wired to the stand-in engine."""
    from conftest import _dispose, _make_dock

    client = EngineClient(lambda: sys.executable, engine_root=fake_root)
    dock = _make_dock(qgis_iface, client)
    qgis_iface.messageBar().messages[Qgis.Warning].clear()
    yield dock
    _dispose(dock)
    client.stop()


def _set_box(dock, raster, x0=10, y0=10, x1=110, y1=110):
    rect = QgsRectangle(X0 + x0, Y1 - y1, X0 + x1, Y1 - y0)
    dock.set_region(region.Region(QgsGeometry.fromRect(rect), raster.crs(), region.RECTANGLE))
    return rect


def _ask(dock, question: str, task: str = "vqa"):
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData(task))
    dock.questionEdit.setCurrentText(question)
    req = dock.ask()
    assert req is not None, dock.statusLabel.text()
    finished(req, 60)
    assert req.error is None, req.error
    return req


def _answers():
    return result_layers.find_layer(result_layers.ANSWERS_LAYER)


def test_answer_view_and_answers_layer_never_show_box_syntax(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "airplanes (old engine)", task="ground")
    assert fake_dock.answerView.toPlainText() == "2 airplanes"
    feature = next(_answers().getFeatures())
    assert feature["answer"] == "2 airplanes"
    assert "{<" not in feature["answer"]


def test_raw_model_output_is_kept_in_its_own_attribute(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    feature = next(_answers().getFeatures())
    assert feature["answer"] == "2 airplanes"
    assert feature["raw"] == "airplane {<29><18><45><31>|0}{<60><60><80><80>|0}"


def test_answers_layer_records_the_raster_it_came_from(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    assert next(_answers().getFeatures())["raster"] == region.raster_path(utm_raster)


def test_streamed_tokens_never_show_box_syntax(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    fake_dock.taskCombo.setCurrentIndex(fake_dock.taskCombo.findData("vqa"))
    fake_dock.questionEdit.setCurrentText("old engine: where?")
    req = fake_dock.ask()
    seen = []
    req.token.connect(lambda _t: seen.append(fake_dock.answerView.toPlainText()))
    finished(req, 60)
    assert len(seen) == 3
    assert not any("<" in text or "{" in text for text in seen)


def test_boxes_are_listed_by_label_and_score(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    boxes = fake_dock.results.boxesList
    rows = [(boxes.topLevelItem(i).text(0), boxes.topLevelItem(i).text(1))
            for i in range(boxes.topLevelItemCount())]
    assert rows == [("airplane", "0.90"), ("airplane", "0.40")]


def test_clicking_a_box_highlights_it_on_the_map(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    boxes = fake_dock.results.boxesList
    fake_dock.results.boxesList.setCurrentItem(boxes.topLevelItem(1))
    highlighted = fake_dock.results.hover_band.asGeometry().boundingBox()
    assert highlighted.xMinimum() == pytest.approx(X0 + 10 + 60)
    assert highlighted.width() == pytest.approx(20)


def test_engine_warnings_are_shown_in_the_dock_and_message_bar(fake_dock, utm_raster,
                                                              qgis_iface):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "warn me: how many airplanes?")
    label = fake_dock.results.warningsLabel
    assert label.isVisibleTo(fake_dock)
    assert "clipped" in label.text() and "far below the model's scale" in label.text()
    pushed = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any("clipped" in message for message in pushed)
    assert any("3x2 source pixels" in message for message in pushed)


def test_an_answer_without_warnings_hides_the_warnings(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "warn me: how many airplanes?")
    _ask(fake_dock, "and how many are white?")
    assert not fake_dock.results.warningsLabel.isVisibleTo(fake_dock)


def test_follow_up_on_the_same_region_sends_the_conversation(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes are there?")
    _ask(fake_dock, "and how many are white?")
    first, second = sent_requests(fake_root)
    assert "history" not in first
    assert second["history"] == [{"question": "how many airplanes are there?",
                                  "answer": "airplane {<29><18><45><31>|0}{<60><60><80><80>|0}"}]


def test_a_follow_up_carries_the_earlier_questions_but_not_captions_or_groundings(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "", task="caption")
    _ask(fake_dock, "airplanes", task="ground")
    _ask(fake_dock, "how many airplanes are there?")
    _ask(fake_dock, "and how many are white?")
    sent = sent_requests(fake_root)
    assert all("history" not in request for request in sent[:3])
    assert [turn["question"] for turn in sent[-1]["history"]] == ["how many airplanes are there?"]


def test_question_on_another_region_starts_a_new_conversation(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes are there?")
    _set_box(fake_dock, utm_raster, 120, 120, 220, 220)
    _ask(fake_dock, "and how many are white?")
    assert "history" not in sent_requests(fake_root)[-1]


def test_new_conversation_button_drops_the_earlier_turns(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes are there?")
    fake_dock.results.newConversationButton.click()
    _ask(fake_dock, "and how many are white?")
    assert "history" not in sent_requests(fake_root)[-1]


def test_history_sent_is_bounded_to_six_turns(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    for n in range(8):
        _ask(fake_dock, f"question {n}?")
    history = sent_requests(fake_root)[-1]["history"]
    assert len(history) == protocol.MAX_HISTORY_TURNS
    assert [turn["question"] for turn in history] == [f"question {n}?" for n in range(1, 7)]


def test_enter_in_the_question_field_asks(fake_dock, utm_raster, fake_root):
    _set_box(fake_dock, utm_raster)
    fake_dock.taskCombo.setCurrentIndex(fake_dock.taskCombo.findData("vqa"))
    fake_dock.questionEdit.setCurrentText("how many airplanes?")
    QTest.keyClick(fake_dock.questionEdit.lineEdit(), Qt.Key_Return)
    assert fake_dock.request is not None
    finished(fake_dock.request, 60)
    assert sent_requests(fake_root)[-1]["question"] == "how many airplanes?"


def test_clicking_an_old_answer_shows_its_region_and_boxes(fake_dock, utm_raster):
    first = _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    _set_box(fake_dock, utm_raster, 120, 120, 220, 220)
    _ask(fake_dock, "classify", task="classify")
    history = fake_dock.results.historyList
    assert history.count() == 2
    item = history.item(0)
    history.itemClicked.emit(item)
    shown = fake_dock.results.answer_band.asGeometry().boundingBox()
    assert shown.xMinimum() == pytest.approx(first.xMinimum())
    assert fake_dock.answerView.toPlainText() == "2 airplanes"
    assert fake_dock.results.boxesList.topLevelItemCount() == 2


def test_score_slider_filters_the_detections_layer(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    detections = result_layers.find_layer(result_layers.DETECTIONS_LAYER)
    assert detections.featureCount() == 2
    fake_dock.results.scoreSlider.setValue(50)
    assert [f["score"] for f in detections.getFeatures()] == [pytest.approx(0.9)]
    assert fake_dock.results.scoreLabel.text() == "Min score 0.50"


def test_zoom_to_last_answer_shows_its_region(fake_dock, utm_raster, shown_canvas):
    rect = _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    shown_canvas.setExtent(QgsRectangle(X0 + 200, Y1 - 256, X0 + 256, Y1 - 200))
    fake_dock.results.zoomAnswerButton.click()
    extent = shown_canvas.extent()
    assert extent.contains(rect)
    assert min(extent.width(), extent.height()) < 2 * rect.width()


def test_attribute_tables_open_on_the_last_answer_and_the_detections(fake_dock, utm_raster,
                                                                    qgis_iface, monkeypatch):
    opened = []
    monkeypatch.setattr(qgis_iface, "showAttributeTable",
                        lambda layer, expression="": opened.append((layer.name(), expression)),
                        raising=False)
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    fake_dock.results.answerTableButton.click()
    fake_dock.results.detectionsTableButton.click()
    answer_id = next(_answers().getFeatures()).id()
    assert opened == [(result_layers.ANSWERS_LAYER, f"$id = {answer_id}"),
                      (result_layers.DETECTIONS_LAYER, "")]


def test_drawn_region_and_answer_outlines_have_distinct_colours(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    outline = _answers().renderer().symbol().symbolLayer(0).strokeColor()
    assert outline.name() != fake_dock.band.strokeColor().name()
    assert fake_dock.results.answer_band.strokeColor().name() != fake_dock.band.strokeColor().name()


def test_only_the_newest_answer_on_a_region_is_labelled(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    _ask(fake_dock, "and how many are white?")
    layer = _answers()
    from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils

    expression = QgsExpression(layer.labeling().settings().fieldName)
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    labels = []
    for feature in layer.getFeatures():
        context.setFeature(feature)
        labels.append(expression.evaluate(context))
    assert labels == [None, "2 airplanes"]


def test_retrieved_entries_carry_their_definitions(fake_dock, utm_raster):
    _set_box(fake_dock, utm_raster)
    _ask(fake_dock, "how many airplanes?")
    item = fake_dock.retrievedList.topLevelItem(0)
    assert item.toolTip(1) == "A fixed-wing aircraft."
    assert item.data(1, Qt.UserRole) == "object.airplane"


# ---------------------------------------------------------------- without an engine
def test_idle_progress_bar_shows_no_percentage(offline_dock):
    assert not offline_dock.progressBar.isTextVisible()


def test_missing_engine_message_names_the_setup_button(offline_dock, utm_raster):
    _set_box(offline_dock, utm_raster)
    req = offline_dock.ask()
    assert wait_until(lambda: req.finished, 5)
    text = offline_dock.statusLabel.text()
    assert offline_dock.setupEngineButton.text() in text
    assert "RS_LVLM_ENGINE_PYTHON" not in text


def test_region_of_a_few_pixels_is_refused_before_asking(offline_dock, utm_raster):
    _set_box(offline_dock, utm_raster, 10, 10, 13, 12)
    assert offline_dock.ask() is None
    assert "only 3 x 2 source pixels" in offline_dock.statusLabel.text()


def test_feature_region_does_not_default_to_the_plugins_answers_layer(offline_dock, project):
    fields = QgsVectorLayer("Polygon?crs=EPSG:32633", "fields", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(X0, Y1 - 50, X0 + 50, Y1)))
    fields.dataProvider().addFeatures([feature])
    project.addMapLayer(fields)
    from test_layers_export import engine_style_result

    result_layers.add_result(engine_style_result(), "tanks", "ground")
    assert offline_dock.featureLayerCombo.currentLayer() is fields


def test_ask_without_a_task_chosen_is_refused(offline_dock, utm_raster):
    _set_box(offline_dock, utm_raster)
    offline_dock.taskCombo.setCurrentIndex(-1)
    assert offline_dock.ask() is None
    assert offline_dock.statusLabel.text() == "Choose a task first."
