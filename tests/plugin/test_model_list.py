"""The settings list the models (embedded default first, then added folders) and the dock says
which model answered."""
from __future__ import annotations

from pathlib import Path

import pytest
from qgis.core import QgsSettings
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QComboBox, QPushButton

from rs_lvlm_qgis import settings
from rs_lvlm_qgis.settings_dialog import EMBEDDED_MODEL, SettingsDialog


@pytest.fixture()
def clean_models():
    """No added folders and the embedded model chosen, before and after each test."""
    for key in (settings.KEY_MODEL_FOLDERS, settings.KEY_MODEL_DIR):
        QgsSettings().remove(key)
    yield
    for key in (settings.KEY_MODEL_FOLDERS, settings.KEY_MODEL_DIR):
        QgsSettings().remove(key)


def _model_folder(path: Path, *files: str) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"{}" if name.endswith(".json") else b"\0")
    return path


def test_combo_lists_embedded_default_first_then_added_folders(tmp_path, clean_models):
    first = _model_folder(tmp_path / "geochat-engine", "config.json", "model.safetensors")
    second = _model_folder(tmp_path / "other", "config.json", "model.safetensors")
    settings.add_model_folder(str(first))
    settings.add_model_folder(str(second))
    dialog = SettingsDialog()
    combo = dialog.findChild(QComboBox, "modelCombo")
    assert combo is dialog.model_combo
    assert dialog.findChild(QPushButton, "addModelButton") is not None
    assert dialog.findChild(QPushButton, "removeModelButton") is not None
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert texts == [EMBEDDED_MODEL, "geochat-engine", "other"]
    assert [combo.itemData(i) for i in range(combo.count())] == ["", str(first), str(second)]
    assert combo.itemData(1, Qt.ToolTipRole) == str(first)
    assert combo.currentIndex() == 0 and dialog.model_dir() == ""
    assert not dialog.remove_model_button.isEnabled()
    dialog.deleteLater()


def test_added_folder_persists_and_selecting_it_sets_model_dir(tmp_path, clean_models):
    folder = _model_folder(tmp_path / "mine", "config.json", "model.safetensors")
    dialog = SettingsDialog()
    assert dialog.add_model_folder(str(folder)) == str(folder)
    assert settings.model_folders() == [str(folder)]  # stored at once, even without OK
    assert dialog.model_dir() == str(folder)
    dialog.model_combo.setCurrentIndex(0)
    dialog.model_combo.setCurrentIndex(1)
    dialog.accept()
    assert settings.load().model_dir == str(folder)

    again = SettingsDialog()  # a new dialog shows the folder, selected
    assert again.model_combo.currentData() == str(folder)
    again.remove_model_folder()
    assert settings.model_folders() == []
    assert settings.load().model_dir == ""
    assert again.model_combo.count() == 1 and again.model_dir() == ""
    for widget in (dialog, again):
        widget.deleteLater()


def test_embedded_choice_saves_an_empty_model_dir(tmp_path, clean_models):
    folder = _model_folder(tmp_path / "mine", "config.json", "model.safetensors")
    QgsSettings().setValue(settings.KEY_MODEL_DIR, str(folder))  # set before the list existed
    dialog = SettingsDialog()
    assert dialog.model_dir() == str(folder) and settings.model_folders() == [str(folder)]
    dialog.model_combo.setCurrentIndex(0)
    dialog.accept()
    assert settings.load().model_dir == ""
    dialog.deleteLater()


def test_unready_folders_are_flagged(tmp_path, clean_models):
    pickles = _model_folder(tmp_path / "geochat", "config.json", "pytorch_model-00001.bin")
    empty = _model_folder(tmp_path / "empty")
    ready = _model_folder(tmp_path / "ready", "config.json", "model.safetensors")
    assert settings.model_folder_problem(str(pickles)) == "needs convert"
    assert settings.model_folder_problem(str(empty)) == "not a model folder"
    assert settings.model_folder_problem(str(tmp_path / "gone")) == "folder not found"
    assert settings.model_folder_problem(str(ready)) == ""
    dialog = SettingsDialog()
    for folder in (pickles, empty, ready):
        dialog.add_model_folder(str(folder))
    texts = [dialog.model_combo.itemText(i) for i in range(dialog.model_combo.count())]
    assert texts == [EMBEDDED_MODEL, "geochat (needs convert)", "empty (not a model folder)", "ready"]
    dialog.deleteLater()


def test_dock_says_which_model_answered(offline_dock):
    from rs_lvlm_qgis.dock_widget import answered_by

    request = object()
    offline_dock.request = request
    offline_dock._meta = {"question": "what is here?", "task": "Describe"}
    result = {"text": "Fields and a road.", "model": "rs-lvlm-tiny", "device": "cpu",
              "crs": "EPSG:32633", "timing": {"total_s": 1.25},
              "extent": {"wkt": "POLYGON((440020 4529800,440200 4529800,440200 4529980,"
                                "440020 4529980,440020 4529800))"}}
    offline_dock._on_result(request, result)
    assert offline_dock.answerView.toPlainText() == "Fields and a road."
    assert offline_dock.statusLabel.text() == "Answered by rs-lvlm-tiny on cpu in 1.2 s."
    answers = offline_dock.last_layers["answers"]
    assert [f["model"] for f in answers.getFeatures()] == ["rs-lvlm-tiny"]
    assert answered_by({"model": {"name": "big"}, "device": "cuda:0"}) == "Answered by big on cuda:0"
    assert answered_by({}) == "Answered"
