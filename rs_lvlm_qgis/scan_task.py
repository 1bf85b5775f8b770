"""A whole-raster scan from the dock: a QgsTask running the engine's ``scan``, its layer added as it fills.

Why a task with its own engine: a scan takes minutes, so it runs in QGIS's task manager (progress
in the status bar, cancel from there or from the dock) while the dock's engine stays free for
questions.  The engine commits each batch to the GeoPackage, so the layer is added as soon as the
first batch is in and repainted after every batch; a cancelled scan keeps what it wrote, and the
same scan started again resumes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from qgis.core import (QgsApplication, QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsTask,
                       QgsVectorLayer)
from qgis.PyQt.QtCore import pyqtSignal

from .processing.engine_call import EngineSession, engine_defaults

__all__ = ["ScanTask", "start_scan", "scan_output_path", "LAYER_TITLES"]

LAYER_TITLES = {"detections": "RS-LVLM scan detections", "tiles": "RS-LVLM scan tiles"}
_LAYER_OF_TASK = {"ground": "detections", "classify": "tiles", "caption": "tiles"}


def scan_output_path(raster: str) -> str:
    """``<raster>_rs_lvlm.gpkg`` beside the raster, else in the QGIS settings folder (read-only media)."""
    path = Path(raster)
    name = f"{path.stem}_rs_lvlm.gpkg"
    if os.access(str(path.parent), os.W_OK):
        return str(path.with_name(name))
    folder = Path(QgsApplication.qgisSettingsDirPath()) / "rs_lvlm" / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / name)


class ScanTask(QgsTask):
    """Runs one scan; ``progressed`` and ``layerFilled`` are delivered on the main thread."""

    progressed = pyqtSignal(int, int, str)
    layerFilled = pyqtSignal(str, str)     # GeoPackage path, layer name (after each committed batch)
    done = pyqtSignal(object, str)         # summary (None on failure), error message

    def __init__(self, params: Dict[str, Any], description: str = "RS-LVLM scan") -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.params = {**engine_defaults(), **params}
        self.layer = _LAYER_OF_TASK.get(str(params.get("task")), "detections")
        self.feedback = QgsProcessingFeedback()
        self.summary: Optional[Dict[str, Any]] = None
        self.error = ""

    def run(self) -> bool:
        def on_progress(done: int, total: int, message: str) -> None:
            if total > 0:
                self.setProgress(100.0 * done / total)
            self.progressed.emit(done, total, message)
            if done > 0:
                self.layerFilled.emit(self.params["out"], self.layer)

        try:
            with EngineSession(self.feedback) as engine:
                self.summary = engine.call("scan", self.params, on_progress)
        except QgsProcessingException as exc:
            self.error = str(exc)
            return False
        return True

    def cancel(self) -> None:
        self.feedback.cancel()
        super().cancel()

    def finished(self, result: bool) -> None:  # noqa: D401 (QgsTask API: main thread)
        if result and self.summary is not None:
            self.layerFilled.emit(self.params["out"], self.layer)
        self.done.emit(self.summary if result else None, self.error)


class _LayerFiller:
    """Adds the scan's layer to the project on the first committed batch, repaints it after the next ones."""

    def __init__(self, project: QgsProject, title: str) -> None:
        self.project = project
        self.title = title
        self.layer: Optional[QgsVectorLayer] = None

    def __call__(self, gpkg: str, name: str) -> None:
        if self.layer is None:
            layer = QgsVectorLayer(f"{gpkg}|layername={name}", self.title, "ogr")
            if not layer.isValid():
                return
            self.layer = layer
            self.project.addMapLayer(layer)
        else:
            self.layer.dataProvider().reloadData()
            self.layer.updateExtents()
            self.layer.triggerRepaint()


_RUNNING: List[ScanTask] = []  # QgsTaskManager does not keep the Python wrapper alive


def start_scan(params: Dict[str, Any], project: Optional[QgsProject] = None) -> ScanTask:
    """Start a scan in QGIS's task manager; the layer appears in ``project`` as it fills."""
    task = ScanTask(params, f"RS-LVLM scan: {Path(str(params.get('raster'))).name}")
    filler = _LayerFiller(project or QgsProject.instance(), LAYER_TITLES[task.layer])
    task.layerFilled.connect(filler)
    task.filler = filler  # type: ignore[attr-defined]  (kept with the task)
    _RUNNING.append(task)
    task.done.connect(lambda *_: _RUNNING.remove(task) if task in _RUNNING else None)
    QgsApplication.taskManager().addTask(task)
    return task
