"""Regions drawn on the canvas with simulated mouse events, and checks before asking."""
from __future__ import annotations

from conftest import UTM_ORIGIN, UTM_SIZE, wait_until
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from rs_lvlm_qgis import protocol, region


def _zoom_to(canvas, layer) -> None:
    canvas.setExtent(layer.extent())
    canvas.refresh()
    wait_until(lambda: canvas.extent().contains(layer.extent()), 5)


def _pixel(canvas, x: float, y: float) -> QPoint:
    """Canvas widget pixel of a map coordinate."""
    point = canvas.getCoordinateTransform().transform(QgsPointXY(x, y))
    return QPoint(round(point.x()), round(point.y()))


def _drag(canvas, start: QPoint, end: QPoint) -> None:
    viewport = canvas.viewport()
    QTest.mousePress(viewport, Qt.LeftButton, Qt.NoModifier, start)
    for step in range(1, 5):
        pos = start + (end - start) * step / 4
        QTest.mouseMove(viewport, pos)
    QTest.mouseRelease(viewport, Qt.LeftButton, Qt.NoModifier, end)


def test_rectangle_drawn_with_mouse_becomes_region(offline_dock, utm_raster, shown_canvas):
    canvas = shown_canvas
    _zoom_to(canvas, utm_raster)
    offline_dock.regionCombo.setCurrentIndex(offline_dock.regionCombo.findData("rectangle"))
    assert canvas.mapTool() is offline_dock.rect_tool
    x0, y1 = UTM_ORIGIN
    corner_a = (x0 + 40, y1 - 50)
    corner_b = (x0 + 140, y1 - 170)
    _drag(canvas, _pixel(canvas, *corner_a), _pixel(canvas, *corner_b))

    chosen = offline_dock.current_region()
    assert chosen.kind == "rectangle"
    assert chosen.crs.authid() == "EPSG:32633"
    box = chosen.geometry.boundingBox()
    tolerance = 2 * canvas.mapUnitsPerPixel()
    assert abs(box.xMinimum() - corner_a[0]) < tolerance
    assert abs(box.xMaximum() - corner_b[0]) < tolerance
    assert abs(box.yMaximum() - corner_a[1]) < tolerance
    assert abs(box.yMinimum() - corner_b[1]) < tolerance
    assert offline_dock.band.isVisible()
    assert canvas.mapTool() is not offline_dock.rect_tool  # drawing ends the tool


def test_polygon_drawn_with_clicks_becomes_polygon_region(offline_dock, utm_raster, shown_canvas):
    canvas = shown_canvas
    _zoom_to(canvas, utm_raster)
    offline_dock.regionCombo.setCurrentIndex(offline_dock.regionCombo.findData("polygon"))
    x0, y1 = UTM_ORIGIN
    vertices = [(x0 + 30, y1 - 30), (x0 + 200, y1 - 40), (x0 + 120, y1 - 200)]
    for vx, vy in vertices:
        QTest.mouseClick(canvas.viewport(), Qt.LeftButton, Qt.NoModifier, _pixel(canvas, vx, vy))
    QTest.mouseClick(canvas.viewport(), Qt.RightButton, Qt.NoModifier, _pixel(canvas, *vertices[-1]))

    chosen = offline_dock.current_region()
    assert chosen.kind == "polygon"
    expected = QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in vertices + vertices[:1]]])
    assert abs(chosen.geometry.area() - expected.area()) / expected.area() < 0.05
    params = protocol.ask_params("/x.tif", chosen, "caption", "", 32)
    assert params["region_wkt"].startswith("Polygon")
    assert params["region_crs"] == "EPSG:32633"
    assert "bbox" not in params


def test_canvas_extent_region_is_sent_as_bbox_in_canvas_crs(offline_dock, utm_raster,
                                                            shown_canvas, project):
    project.setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    shown_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    shown_canvas.setExtent(QgsRectangle(1_490_000, 5_055_000, 1_495_000, 5_060_000))
    chosen = offline_dock.current_region()
    assert chosen.kind == "canvas"
    params = protocol.ask_params("/x.tif", chosen, "caption", "", 32)
    assert params["bbox_crs"] == "EPSG:3857"
    assert len(params["bbox"]) == 4 and params["bbox"][0] < params["bbox"][2]


def test_selected_feature_region_uses_union_in_layer_crs(offline_dock, utm_raster, project):
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "fields", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(14.30, 40.92, 14.301, 40.921)))
    layer.dataProvider().addFeatures([feature])
    project.addMapLayer(layer)
    offline_dock.regionCombo.setCurrentIndex(offline_dock.regionCombo.findData("feature"))
    offline_dock.featureLayerCombo.setLayer(layer)
    assert offline_dock.featureLayerCombo.isVisibleTo(offline_dock)
    try:
        offline_dock.current_region()
        raise AssertionError("no selection must be refused")
    except region.RegionError as exc:
        assert "Select a feature" in str(exc)
    layer.selectAll()
    chosen = offline_dock.current_region()
    assert chosen.kind == "feature" and chosen.crs.authid() == "EPSG:4326"


def test_ask_without_raster_layer_shows_message(offline_dock, project):
    assert offline_dock.ask() is None
    assert "raster layer" in offline_dock.statusLabel.text()
    assert offline_dock.request is None


def test_ask_with_region_off_raster_shows_message(offline_dock, utm_raster):
    far_away = QgsGeometry.fromRect(QgsRectangle(100_000, 100_000, 100_100, 100_100))
    offline_dock.set_region(region.Region(far_away, utm_raster.crs(), "rectangle"))
    assert offline_dock.ask() is None
    assert "does not overlap" in offline_dock.statusLabel.text()


def test_ask_task_with_empty_question_shows_message(offline_dock, utm_raster):
    x0, y1 = UTM_ORIGIN
    inside = QgsGeometry.fromRect(QgsRectangle(x0 + 10, y1 - 100, x0 + 100, y1 - 10))
    offline_dock.set_region(region.Region(inside, utm_raster.crs(), "rectangle"))
    offline_dock.taskCombo.setCurrentIndex(offline_dock.taskCombo.findData("vqa"))
    offline_dock.questionEdit.setCurrentText("   ")
    assert offline_dock.ask() is None
    assert "Type a question" in offline_dock.statusLabel.text()


def test_ask_without_engine_offers_engine_setup(offline_dock, utm_raster):
    x0, y1 = UTM_ORIGIN
    inside = QgsGeometry.fromRect(QgsRectangle(x0, y1 - UTM_SIZE, x0 + UTM_SIZE, y1))
    offline_dock.set_region(region.Region(inside, utm_raster.crs(), "rectangle"))
    req = offline_dock.ask()
    assert req is not None
    assert wait_until(lambda: req.finished, 5)
    assert req.error[0] == "engine_missing"
    assert offline_dock.setupEngineButton.isVisibleTo(offline_dock)
    assert "not set up" in offline_dock.statusLabel.text()
