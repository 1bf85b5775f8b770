"""The knowledge base from QGIS: entries listed and searched, the analyst's own added and
edited in their profile, the index rebuilt by the real engine in a background task."""
from __future__ import annotations

import json

import pytest
from conftest import ENGINE_PYTHON, REPO, finished, needs_engine, needs_model, wait_until
from qgis.core import QgsSettings, QgsTask
from qgis.PyQt.QtWidgets import QWidget

from rs_lvlm_qgis import settings
from rs_lvlm_qgis.engine_client import EngineClient
from rs_lvlm_qgis.knowledge_dialog import KnowledgeDialog

SHIPPED = REPO / "resources" / "knowledge" / "entries.jsonl"


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "knowledge" / "entries.jsonl"
    QgsSettings().setValue(settings.KEY_KNOWLEDGE_FILE, str(path))
    yield path
    QgsSettings().remove(settings.KEY_KNOWLEDGE_FILE)


@pytest.fixture()
def dialog(user_file):
    widget = KnowledgeDialog()
    yield widget
    widget.deleteLater()


def _add(dialog, name="fish farm", kind="object_class",
         definition="Rectangular floating cages in calm coastal water, in rows."):
    dialog.new_entry()
    dialog.kindCombo.setCurrentText(kind)
    dialog.nameEdit.setText(name)
    dialog.definitionEdit.setPlainText(definition)
    return dialog.save_entry()


def test_dialog_lists_every_shipped_entry_with_level_name_and_definition(dialog):
    shipped = [json.loads(line) for line in SHIPPED.read_text().splitlines() if line.strip()]
    assert dialog.table.rowCount() == len(shipped)
    headers = [dialog.table.horizontalHeaderItem(c).text() for c in range(4)]
    assert headers == ["Level", "Name", "Definition", "From"]
    airport = dialog.show_entry("scene.airport")
    assert airport is not None and airport.level == "scene"
    row = dialog.table.currentRow()
    assert dialog.table.item(row, 1).text() == "airport"


def test_search_filters_the_entries(dialog):
    dialog.searchEdit.setText("runway")
    names = {dialog.table.item(r, 1).text() for r in range(dialog.table.rowCount())}
    assert "airport" in names and 0 < len(names) < 20


def test_shipped_entries_are_read_only(dialog):
    dialog.show_entry("scene.airport")
    assert not dialog.saveButton.isEnabled()
    assert dialog.definitionEdit.isReadOnly()


def test_an_added_entry_is_saved_in_the_users_file(dialog, user_file):
    entry = _add(dialog)
    assert entry is not None and entry.id == "user.object.fish_farm"
    saved = [json.loads(line) for line in user_file.read_text().splitlines()]
    assert saved == [{"id": "user.object.fish_farm", "level": "object", "kind": "object_class",
                      "name": "fish farm",
                      "definition": "Rectangular floating cages in calm coastal water, in rows.",
                      "aliases": [], "sources": ["general"]}]
    assert dialog.table.item(0, 3).text() == "yours"


def test_editing_an_entry_replaces_it(dialog, user_file):
    _add(dialog)
    dialog.show_entry("user.object.fish_farm")
    dialog.definitionEdit.setPlainText("Floating square net pens moored offshore.")
    dialog.save_entry()
    saved = [json.loads(line) for line in user_file.read_text().splitlines()]
    assert [row["definition"] for row in saved] == ["Floating square net pens moored offshore."]


def test_an_entry_without_definition_is_refused(dialog, user_file):
    assert _add(dialog, definition="cages") is None
    assert "definition" in dialog.statusLabel.text()
    assert not user_file.exists()


def test_dock_opens_the_knowledge_base_on_a_retrieved_entry(offline_dock, user_file):
    opened = offline_dock.open_knowledge("object.airplane", modal=False)
    try:
        assert opened.entry_at(opened.table.currentRow()).id == "object.airplane"
    finally:
        opened.deleteLater()


@needs_engine
def test_rebuild_runs_the_engines_build_knowledge_with_the_users_entries(dialog, user_file):
    _add(dialog)
    task = dialog.rebuild(str(ENGINE_PYTHON))
    assert task is not None
    assert wait_until(lambda: task.status() in (QgsTask.Complete, QgsTask.Terminated), 600)
    assert task.status() == QgsTask.Complete, task.error
    shipped = sum(1 for line in SHIPPED.read_text().splitlines() if line.strip())
    meta = json.loads((settings.user_knowledge_index() / "meta.json").read_text())
    assert meta["count"] == shipped + 1
    indexed = (settings.user_knowledge_index() / "entries.jsonl").read_text()
    assert "user.object.fish_farm" in indexed
    assert "Index rebuilt" in dialog.statusLabel.text()


def test_the_engine_is_started_with_the_rebuilt_index_only_once_there_is_one(user_file):
    assert settings.engine_serve_arguments() == []
    index = settings.user_knowledge_index()
    index.mkdir(parents=True)
    (index / "index.faiss").write_bytes(b"")
    assert settings.engine_serve_arguments() == ["--knowledge", str(index)]


@needs_model
def test_after_a_rebuild_the_next_question_retrieves_from_the_new_index(user_file):
    client = EngineClient(lambda: str(ENGINE_PYTHON), serve_arguments=settings.engine_serve_arguments)
    panel = QWidget()
    panel.client = client                                   # what the dock offers its dialogs
    dialog = KnowledgeDialog(panel)
    try:
        before = finished(client.request("info"), 300).result["model"]
        assert before["knowledge_index"].endswith("knowledge")          # the checkpoint's own
        _add(dialog)
        task = dialog.rebuild(str(ENGINE_PYTHON))
        assert wait_until(lambda: task.status() in (QgsTask.Complete, QgsTask.Terminated), 600)
        assert task.status() == QgsTask.Complete, task.error
        assert wait_until(lambda: not client.is_running(), 30)          # restarted when idle
        after = finished(client.request("info"), 300).result["model"]
        assert after["knowledge_index"] == str(settings.user_knowledge_index())
        assert after["knowledge_entries"] == before["knowledge_entries"] + 1
        assert "next question" in dialog.statusLabel.text()
    finally:
        client.stop()
        dialog.deleteLater()
        panel.deleteLater()
