"""Shared fixtures for the plugin tests: a real QgsApplication (pytest-qgis), real GeoTIFFs
written with GDAL, and a real engine subprocess (``.venv-engine/bin/python -m engine serve``).

Run with QGIS's Python: ``QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python -m pytest tests/plugin``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from osgeo import gdal, osr  # noqa: E402
from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, QEvent  # noqa: E402

ENGINE_PYTHON = REPO / ".venv-engine" / "bin" / "python"
# RS_LVLM_TEST_MODEL points the model tests at another checkpoint folder (default: embedded).
MODEL_DIR = Path(os.environ.get("RS_LVLM_TEST_MODEL") or REPO / "resources" / "model")
SAMPLE_RASTER = REPO / "resources" / "sample" / "sample_utm33n.tif"
model_available = (MODEL_DIR / "config.json").is_file()
engine_available = ENGINE_PYTHON.is_file() and (REPO / "engine" / "__main__.py").is_file()

needs_engine = pytest.mark.skipif(not engine_available,
                                  reason="engine venv (.venv-engine) or engine/__main__.py missing")
needs_model = pytest.mark.skipif(not (engine_available and model_available),
                                 reason="no trained model yet (resources/model/config.json)")

# The tests' GeoTIFF: 256 x 256 px of 1 m in UTM 33N (north of Naples, on land).
UTM_ORIGIN = (440_000.0, 4_530_000.0)
UTM_PIXEL = 1.0
UTM_SIZE = 256


def make_geotiff(path: Path, epsg: int = 32633, origin: Tuple[float, float] = UTM_ORIGIN,
                 pixel: float = UTM_PIXEL, size: int = UTM_SIZE) -> Path:
    """Write a small RGB uint8 GeoTIFF with some structure (a grid of bright squares)."""
    driver = gdal.GetDriverByName("GTiff")
    ds = driver.Create(str(path), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((origin[0], pixel, 0.0, origin[1], 0.0, -pixel))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetProjection(srs.ExportToWkt())
    for band_no, base in zip((1, 2, 3), (60, 90, 50)):
        data = bytearray(size * size)
        for row in range(size):
            for col in range(size):
                bright = (row // 32 + col // 32) % 3 == 0 and row % 32 > 8 and col % 32 > 8
                data[row * size + col] = 220 if bright else base + (row * col) % 40
        ds.GetRasterBand(band_no).WriteRaster(0, 0, size, size, bytes(data))
    ds.FlushCache()
    ds = None
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Spin the Qt event loop until ``predicate`` holds (True) or the time runs out (False)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        QCoreApplication.processEvents()
        if predicate():
            return True
        time.sleep(0.01)
    QCoreApplication.processEvents()
    return predicate()


@pytest.fixture()
def project(qgis_iface) -> Iterator[QgsProject]:
    """A fresh project (no layers, no groups) in the raster's CRS."""
    qgis_iface.newProject()
    instance = QgsProject.instance()
    instance.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    qgis_iface.mapCanvas().setDestinationCrs(instance.crs())
    yield instance
    _stop_rendering(qgis_iface.mapCanvas())
    qgis_iface.newProject()


def _stop_rendering(canvas) -> None:
    """Finish the canvas's render job before the project's layers go: a shown canvas renders
    in worker threads, and a GeoPackage layer removed under a running job crashes QGIS 3.22
    (a test removes layers microseconds after adding them; a person never does)."""
    canvas.stopRendering()
    wait_until(lambda: not canvas.isDrawing(), 10)


@pytest.fixture()
def utm_raster(tmp_path: Path, project: QgsProject) -> QgsRasterLayer:
    """A GeoTIFF in EPSG:32633, added to the project."""
    layer = QgsRasterLayer(str(make_geotiff(tmp_path / "scene_utm33n.tif")), "scene")
    assert layer.isValid()
    project.addMapLayer(layer)
    return layer


@pytest.fixture()
def shown_canvas(qgis_parent, qgis_canvas):
    """The pytest-qgis canvas, shown (offscreen) so it has a real size for mouse events."""
    qgis_parent.show()
    qgis_canvas.show()
    qgis_canvas.resize(600, 600)
    wait_until(lambda: qgis_canvas.mapSettings().outputSize() == qgis_canvas.viewport().size(), 5)
    return qgis_canvas


@pytest.fixture(scope="session")
def engine_client():
    """One real engine process for the whole session, as in QGIS (the model stays loaded)."""
    if not engine_available:
        pytest.skip("engine venv (.venv-engine) or engine/__main__.py missing")
    from rs_lvlm_qgis.engine_client import EngineClient

    client = EngineClient(lambda: str(ENGINE_PYTHON))
    yield client
    client.stop()


@pytest.fixture()
def no_engine_client():
    """A client without an interpreter: every request fails with ``engine_missing``, no process."""
    from rs_lvlm_qgis.engine_client import EngineClient

    client = EngineClient(lambda: None)
    yield client
    client.deleteLater()


def _make_dock(qgis_iface, client):
    from rs_lvlm_qgis.dock_widget import RsLvlmDock

    dock = RsLvlmDock(qgis_iface, client, qgis_iface.mainWindow())
    dock.resize(380, 700)
    dock.show()
    return dock


def _dispose(widget) -> None:
    """Remove a dock for good (deleteLater alone waits for an event loop that tests lack)."""
    widget.shutdown()
    widget.close()
    widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


@pytest.fixture()
def dock(qgis_iface, project, engine_client):
    """The dock wired to the real engine."""
    widget = _make_dock(qgis_iface, engine_client)
    yield widget
    _dispose(widget)


@pytest.fixture()
def offline_dock(qgis_iface, project, no_engine_client):
    """The dock with no engine at all (for input validation and UI behaviour)."""
    widget = _make_dock(qgis_iface, no_engine_client)
    yield widget
    _dispose(widget)


def finished(request, timeout_s: float = 120.0) -> Optional[object]:
    """Wait for an EngineRequest to end; returns it (asserting it did end)."""
    assert wait_until(lambda: request.finished, timeout_s), f"{request.method} did not finish"
    return request


def engine_python_env(monkeypatch) -> None:
    """Point the plugin's interpreter lookup at the repo's engine venv (the contract's env var)."""
    monkeypatch.setenv("RS_LVLM_ENGINE_PYTHON", str(ENGINE_PYTHON))


@pytest.fixture(autouse=True)
def _no_engine_python_env(monkeypatch):
    """Tests start without RS_LVLM_ENGINE_PYTHON unless they set it."""
    monkeypatch.delenv("RS_LVLM_ENGINE_PYTHON", raising=False)
    os.environ.pop("RS_LVLM_ENGINE_PYTHON", None)
