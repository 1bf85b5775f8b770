"""The plugin loads through classFactory and its dock has the contract's widgets."""
from __future__ import annotations

from qgis.core import QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtWidgets import QAction, QComboBox, QDockWidget, QPushButton

import rs_lvlm_qgis
from rs_lvlm_qgis import settings
from rs_lvlm_qgis.dock_widget import RsLvlmDock
from rs_lvlm_qgis.messages import describe_engine
from rs_lvlm_qgis.engine_client import EngineClient

CONTRACT_NAMES = ("layerCombo", "regionCombo", "taskCombo", "questionEdit", "askButton",
                  "cancelButton", "answerView")


def test_class_factory_creates_plugin_with_toolbar_action(qgis_iface):
    plugin = rs_lvlm_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert isinstance(plugin.action, QAction)
        assert plugin.action.text() == "RS-LVLM"
        assert not plugin.action.icon().isNull()
    finally:
        plugin.unload()
    assert plugin.action is None


def test_plugin_action_opens_dock_named_rs_lvlm_dock(qgis_iface, project):
    plugin = rs_lvlm_qgis.classFactory(qgis_iface)
    plugin.initGui()
    # no interpreter: opening the dock must not start anything nor raise
    plugin.client = EngineClient(lambda: None)
    try:
        plugin.action.trigger()
        assert isinstance(plugin.dock, QDockWidget)
        assert plugin.dock.objectName() == "RsLvlmDock"
        found = qgis_iface.mainWindow().findChildren(QDockWidget, "RsLvlmDock")
        assert plugin.dock in found
    finally:
        plugin.unload()


def test_dock_has_all_contract_object_names(offline_dock):
    for name in CONTRACT_NAMES:
        assert offline_dock.findChild(object, name) is not None, name
    assert offline_dock.findChild(QPushButton, "askButton").text() == "Ask"


def test_layer_combo_lists_only_raster_layers(offline_dock, utm_raster, project):
    vector = QgsVectorLayer("Polygon?crs=EPSG:32633", "polygons", "memory")
    points = QgsVectorLayer("Point?crs=EPSG:4326", "points", "memory")
    project.addMapLayers([vector, points])
    combo = offline_dock.layerCombo
    listed = [combo.layer(i) for i in range(combo.count())]
    assert listed == [utm_raster]
    assert all(isinstance(layer, QgsRasterLayer) for layer in listed)


def test_region_combo_starts_with_canvas_extent(offline_dock):
    combo = offline_dock.findChild(QComboBox, "regionCombo")
    assert combo.itemData(0) == "canvas"
    assert "canvas extent" in combo.itemText(0).lower()
    assert [combo.itemData(i) for i in range(combo.count())] == \
        ["canvas", "rectangle", "polygon", "feature", "scan_whole", "scan_visible"]  # the last two: tiled scans


def test_task_combo_names_tasks_for_people_and_sends_protocol_ids(offline_dock):
    combo = offline_dock.taskCombo
    assert [combo.itemText(i) for i in range(combo.count())] == \
        ["Describe", "Ask", "Find objects", "Classify scene"]
    assert [combo.itemData(i) for i in range(combo.count())] == \
        ["caption", "vqa", "ground", "classify"]


def test_question_history_is_kept_in_settings(qgis_iface, project, no_engine_client):
    settings.remember_question("how many ships are there?")
    settings.remember_question("where is the largest tank?")
    settings.remember_question("how many ships are there?")
    assert settings.question_history()[:2] == ["how many ships are there?",
                                               "where is the largest tank?"]
    dock = RsLvlmDock(qgis_iface, no_engine_client, qgis_iface.mainWindow())
    try:
        items = [dock.questionEdit.itemText(i) for i in range(dock.questionEdit.count())]
        assert items[:2] == ["how many ships are there?", "where is the largest tank?"]
        assert dock.questionEdit.isEditable()
    finally:
        dock.shutdown()
        dock.deleteLater()


def test_device_label_text_names_cuda_device_and_model_size():
    text = describe_engine({"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda",
                            "model": {"name": "rs-lvlm-tiny", "parameters": {"total": 12_345_678},
                                      "loaded": True}})
    assert text == "CUDA: NVIDIA H100 80GB HBM3 · model rs-lvlm-tiny (12.3 M parameters)"
    text = describe_engine({"device": "CPU (x86_64, 2 threads)", "device_type": "cpu",
                            "model": {"loaded": False, "path": "/x"}})
    assert text.startswith("CPU") and "no model" in text
