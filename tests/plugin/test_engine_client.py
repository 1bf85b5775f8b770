"""The engine client against the real engine process (no mocks)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import ENGINE_PYTHON, REPO, UTM_ORIGIN, finished, needs_engine, wait_until
from qgis.core import QgsGeometry, QgsRectangle, QgsSettings
from qgis.PyQt.QtCore import QProcessEnvironment

from rs_lvlm_qgis import region, settings
from rs_lvlm_qgis.engine_client import EngineClient, child_environment

pytestmark = needs_engine


def _set_inside_region(dock, raster) -> None:
    x0, y1 = UTM_ORIGIN
    inside = QgsGeometry.fromRect(QgsRectangle(x0 + 20, y1 - 200, x0 + 200, y1 - 20))
    dock.set_region(region.Region(inside, raster.crs(), "rectangle"))


@pytest.fixture()
def empty_model_dir(tmp_path: Path):
    """A model folder without a checkpoint: the engine must answer ``no_model``."""
    folder = tmp_path / "no_model_here"
    folder.mkdir()
    QgsSettings().setValue(settings.KEY_MODEL_DIR, str(folder))
    yield folder
    QgsSettings().remove(settings.KEY_MODEL_DIR)


def test_info_from_real_engine_shows_device(dock):
    req = finished(dock.refresh_engine_info())
    assert req.error is None, req.error
    assert req.result["device_type"] in ("cpu", "cuda")
    assert req.result["engine_version"]
    label = dock.deviceLabel.text()
    assert label.startswith("CPU") or label.startswith("CUDA: ")
    assert "model" in label


def test_engine_child_environment_drops_qgis_python_and_gdal_variables(monkeypatch):
    for key, value in (("PYTHONHOME", "/qgis/python"), ("PYTHONPATH", "/qgis/site"),
                       ("GDAL_DATA", "/qgis/gdal"), ("PROJ_LIB", "/qgis/proj"),
                       ("LD_LIBRARY_PATH", "/qgis/lib")):
        monkeypatch.setenv(key, value)
    env = child_environment(QProcessEnvironment.systemEnvironment(), REPO)
    assert not [k for k in env.keys() if k in ("PYTHONHOME", "LD_LIBRARY_PATH")
                or k.startswith(("GDAL_", "PROJ_"))]
    assert env.value("PYTHONPATH") == str(REPO)

    client = EngineClient(lambda: str(ENGINE_PYTHON))
    try:
        req = finished(client.request("info"))
        assert req.error is None, req.error
        if sys.platform.startswith("linux"):
            raw = Path(f"/proc/{client.process_id()}/environ").read_bytes()
            keys = {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}
            assert not {"PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "LD_LIBRARY_PATH"} & keys
    finally:
        client.stop()


def test_ask_without_model_shows_no_model_message(dock, utm_raster, empty_model_dir):
    _set_inside_region(dock, utm_raster)
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData("caption"))
    req = dock.ask()
    assert req is not None
    finished(req)
    assert req.error is not None and req.error[0] == "no_model"
    text = dock.statusLabel.text()
    assert text.startswith("No model is available")
    assert not dock.cancelButton.isEnabled()


def test_new_question_drops_stale_answer(engine_client, utm_raster, empty_model_dir):
    x0, y1 = UTM_ORIGIN
    params = {"raster": utm_raster.source(), "bbox": [x0, y1 - 100, x0 + 100, y1],
              "bbox_crs": "EPSG:32633", "task": "caption", "model": str(empty_model_dir)}
    first = engine_client.ask(params)
    seen_first = []
    first.failed.connect(lambda code, msg: seen_first.append(code))
    first.succeeded.connect(lambda result: seen_first.append("result"))
    second = engine_client.ask(dict(params, task="classify"))
    finished(second)
    assert first.error[0] == "superseded"
    assert second.error[0] == "no_model"
    wait_until(lambda: False, 0.5)  # let any late reply for the first ask arrive
    assert seen_first == ["superseded"]  # its own late no_model reply was dropped


def test_request_times_out_and_late_reply_is_dropped():
    client = EngineClient(lambda: str(ENGINE_PYTHON))
    try:
        slow = client.request("info", timeout_s=0.05)  # the engine needs > 50 ms to import torch
        finished(slow, 30)
        assert slow.error[0] == "timeout"
        after = finished(client.request("info"))
        assert after.error is None
        assert slow.result is None
    finally:
        client.stop()


def test_killed_engine_is_restarted_with_message_and_next_info_works(dock, qgis_iface):
    first = finished(dock.refresh_engine_info())
    assert first.error is None
    old_pid = dock.client.process_id()
    warnings_before = len(qgis_iface.messageBar().get_messages(1))
    req = dock.client.request("info")
    os.kill(old_pid, signal.SIGKILL)  # dies before the request was even read
    finished(req, 30)
    assert req.error[0] == "engine_died"
    assert "restarted" in req.error[1]
    assert wait_until(lambda: dock.client.process_id() not in (0, old_pid), 30)
    bar = qgis_iface.messageBar().get_messages(1)  # Qgis.Warning
    assert len(bar) > warnings_before and "restarted" in bar[-1]
    assert "restarted" in dock.statusLabel.text()
    again = finished(dock.client.request("info"))
    assert again.error is None and again.result["device_type"] in ("cpu", "cuda")


def test_engine_stderr_goes_to_message_log(engine_client):
    from qgis.core import QgsApplication

    lines = []

    def collect(message, tag, _level):
        if tag == "RS-LVLM":
            lines.append(message)

    QgsApplication.messageLog().messageReceived.connect(collect)
    try:
        engine_client.stop()
        finished(engine_client.request("info"))
        assert wait_until(lambda: any("engine server ready" in line for line in lines), 10)
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(collect)


def test_polygon_region_in_web_mercator_is_accepted_by_engine(dock, utm_raster, empty_model_dir,
                                                             project):
    """The engine reads the window before it needs the model: ``no_model`` (rather than
    ``bad_request``/``region_off_raster``) proves it took the polygon and its CRS."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform

    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    project.setCrs(mercator)
    to_mercator = QgsCoordinateTransform(utm_raster.crs(), mercator, project)
    x0, y1 = UTM_ORIGIN
    triangle = QgsGeometry.fromWkt(
        f"POLYGON(({x0 + 20} {y1 - 20}, {x0 + 200} {y1 - 40}, {x0 + 100} {y1 - 220}, {x0 + 20} {y1 - 20}))")
    triangle.transform(to_mercator)
    dock.set_region(region.Region(triangle, mercator, "polygon"))
    dock.taskCombo.setCurrentIndex(dock.taskCombo.findData("classify"))
    req = dock.ask()
    assert req is not None, dock.statusLabel.text()
    assert req.params["region_crs"] == "EPSG:3857" and "region_wkt" in req.params
    finished(req)
    assert req.error[0] == "no_model", req.error


def test_progress_reaches_the_panel_before_the_answer(dock, utm_raster, empty_model_dir):
    _set_inside_region(dock, utm_raster)
    req = dock.ask()
    messages = []
    req.progress.connect(lambda done, total, message: messages.append((done, total, message)))
    finished(req)
    assert messages and messages[0][1] > 0  # e.g. (0, 3, "reading the raster window")


def test_interpreter_that_cannot_start_reports_engine_missing():
    client = EngineClient(lambda: "/nonexistent/bin/python")
    req = finished(client.request("info"), 10)
    assert req.error[0] == "engine_missing"
    assert "settings" in req.error[1]
    assert not client.is_running()


def _healthy_client(**health) -> EngineClient:
    """A client whose engine has answered once (health checks start after a first answer)."""
    client = EngineClient(lambda: str(ENGINE_PYTHON), **health)
    assert finished(client.request("info", {"load_model": False})).error is None
    return client


def _frozen_ask(client: EngineClient, tmp_path: Path, cancel: bool = False):
    """Freeze the engine (alive, answering nothing: wedged), ask, maybe cancel; wait for the end."""
    messages: list = []
    client.restarted.connect(messages.append)
    old_pid = client.process_id()
    os.kill(old_pid, signal.SIGSTOP)
    req = client.ask({"raster": str(tmp_path / "none.tif"), "task": "caption"}, timeout_s=600)
    if cancel:
        client.cancel(req)
    finished(req, 60)
    return req, messages, old_pid


def test_a_frozen_engine_misses_its_health_check_and_is_restarted_with_a_message(tmp_path):
    client = _healthy_client(ping_interval_s=0.2, ping_timeout_s=2.0)
    try:
        req, messages, old_pid = _frozen_ask(client, tmp_path)
        assert req.error[0] == "engine_died" and "stopped responding" in req.error[1]
        assert messages and "health check" in messages[0]
        assert wait_until(lambda: client.process_id() not in (0, old_pid), 30)
        assert finished(client.request("info", {"load_model": False})).error is None
    finally:
        client.stop()


def test_a_cancelled_request_the_engine_never_ends_restarts_the_engine(tmp_path):
    client = _healthy_client(ping_interval_s=1000.0, cancel_grace_s=1.0)
    try:
        req, messages, old_pid = _frozen_ask(client, tmp_path, cancel=True)
        assert req.error[0] == "engine_died" and messages and "cancelled request" in messages[0]
        assert wait_until(lambda: client.process_id() not in (0, old_pid), 30)
    finally:
        client.stop()


def test_a_cancel_that_lands_or_arrives_late_never_restarts_a_healthy_engine(tmp_path):
    client = _healthy_client(ping_interval_s=0.2, ping_timeout_s=5.0, cancel_grace_s=1.0)
    messages = []
    client.restarted.connect(messages.append)
    try:
        pid = client.process_id()
        for _ in range(3):
            req = client.ask({"raster": str(tmp_path / "none.tif"), "task": "caption"})
            client.cancel(req)
            finished(req, 60)
        wait_until(lambda: bool(messages), 3)  # longer than the cancel grace
        assert messages == [] and client.process_id() == pid
    finally:
        client.stop()
