"""The dock's tiled scan as a QgsTask: the layer appears in the project as the engine fills it.

Real QgsApplication, real engine subprocess and embedded model, a small GeoTIFF.
"""
from __future__ import annotations

import pytest
from qgis.core import QgsProject

from conftest import engine_python_env, make_geotiff, needs_model, wait_until
from rs_lvlm_qgis import scan_task


@needs_model
def test_a_scan_task_adds_its_tiles_layer_to_the_project(tmp_path, project, monkeypatch):
    engine_python_env(monkeypatch)
    raster = make_geotiff(tmp_path / "scene.tif")
    task = scan_task.start_scan({"raster": str(raster), "task": "classify", "tile": 128,
                                 "out": str(tmp_path / "scan.gpkg")}, project)
    outcome = []
    task.done.connect(lambda summary, error: outcome.append((summary, error)))
    assert wait_until(lambda: outcome, 300), "the scan task did not finish"
    summary, error = outcome[0]
    assert summary is not None, error
    layers = QgsProject.instance().mapLayersByName(scan_task.LAYER_TITLES["tiles"])
    assert len(layers) == 1 and layers[0].featureCount() == summary["tiles"]["total"] == 4


def test_the_dock_refuses_a_tiled_vqa_with_a_message(tmp_path, utm_raster, qgis_canvas):
    with pytest.raises(ValueError, match="ground, classify or caption"):
        scan_task.dock_scan_params(utm_raster, scan_task.WHOLE_RASTER, qgis_canvas, "vqa", "how many?")


def test_visible_extent_sends_the_canvas_extent_in_the_canvas_crs(tmp_path, utm_raster, qgis_canvas):
    qgis_canvas.setExtent(utm_raster.extent())
    params = scan_task.dock_scan_params(utm_raster, scan_task.VISIBLE_TILED, qgis_canvas, "ground", "")
    assert params["bbox_crs"] == qgis_canvas.mapSettings().destinationCrs().authid()
    assert len(params["bbox"]) == 4 and params["out"].endswith("_rs_lvlm.gpkg")


def _scan_from_dock(dock, raster, task: str, monkeypatch) -> list:
    """Choose the raster, "Whole raster" and ``task``, press Ask; the list fills with (summary, error)."""
    engine_python_env(monkeypatch)
    dock.layerCombo.setLayer(raster)
    dock.regionCombo.setCurrentIndex(dock.regionCombo.findData(scan_task.WHOLE_RASTER))
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData(task))
    dock.ask()
    assert dock.scan_task is not None, "Ask did not start a scan"
    outcome: list = []
    dock.scan_task.done.connect(lambda summary, error: outcome.append((summary, error)))
    return outcome


@needs_model
def test_the_dock_whole_raster_choice_scans_and_adds_the_layer(offline_dock, utm_raster, monkeypatch):
    outcome = _scan_from_dock(offline_dock, utm_raster, "classify", monkeypatch)
    assert wait_until(lambda: outcome, 300), "the scan did not finish"
    summary = outcome[0][0]
    layers = QgsProject.instance().mapLayersByName(scan_task.LAYER_TITLES["tiles"])
    assert summary is not None and layers and layers[0].featureCount() == summary["tiles"]["total"]


@needs_model
def test_cancel_in_the_dock_stops_the_scan(offline_dock, utm_raster, monkeypatch):
    outcome = _scan_from_dock(offline_dock, utm_raster, "ground", monkeypatch)
    offline_dock.cancel()
    assert wait_until(lambda: outcome, 300), "the cancelled scan did not end"
    assert outcome[0][0] is None and "Cancelled" in outcome[0][1]
