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
        if not result and not self.error and self.isCanceled():
            # cancelled before run() started (QGIS then never runs it): say so, as a running one does
            self.error = "Cancelled before the scan started; nothing was written."
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


# ------------------------------------------------------------------ the dock's scan choices

WHOLE_RASTER = "scan_whole"
VISIBLE_TILED = "scan_visible"
REGION_CHOICES = ((WHOLE_RASTER, "Whole raster"), (VISIBLE_TILED, "Visible extent, tiled"))
SCAN_KINDS = (WHOLE_RASTER, VISIBLE_TILED)
SCAN_TASKS = tuple(_LAYER_OF_TASK)


def dock_scan_params(raster: Any, kind: str, canvas: Any, task: str, question: str) -> Dict[str, Any]:
    """The scan request for the dock's current choices; ``ValueError`` with a message for the analyst."""
    from .region import crs_to_engine

    if raster is None or not raster.isValid():
        raise ValueError("Choose a raster layer first.")
    if raster.providerType() != "gdal":
        raise ValueError(f"{raster.name()} is not a GDAL raster; save it as a GeoTIFF to scan it.")
    if task not in SCAN_TASKS:
        raise ValueError("A tiled scan runs ground, classify or caption: choose one of these tasks.")
    path = raster.source().split("|")[0]
    params: Dict[str, Any] = {"raster": path, "task": task, "out": scan_output_path(path)}
    if question:
        params["question"] = question
    if kind == VISIBLE_TILED:
        extent = canvas.extent()
        params["bbox"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
        params["bbox_crs"] = crs_to_engine(canvas.mapSettings().destinationCrs())
    return params


def start_dock_scan(dock: Any) -> Optional[ScanTask]:
    """Start the scan the dock's choices describe, showing its progress in the dock."""
    from qgis.core import Qgis

    try:
        params = dock_scan_params(dock.layerCombo.currentLayer(), dock.region_kind(), dock.canvas,
                                  str(dock.taskCombo.currentData()), dock.question())
    except ValueError as exc:
        dock.show_message(str(exc), Qgis.Warning)
        return None
    task = start_scan(params)
    dock.scan_task = task

    def progressed(done: int, total: int, message: str) -> None:
        dock.show_progress(done, total, message)

    def finished(summary: Optional[Dict[str, Any]], error: str) -> None:
        dock.cancelButton.setEnabled(False)
        dock.scan_task = None
        if summary is None:
            dock.show_message(error or "The scan failed.", Qgis.Warning)
            return
        dock.show_message(f"Scan done: {summary['tiles']['done']} tiles, {summary.get('features', 0)} features "
                          f"in {summary['out']} (layer {summary['layers'][0]}).")

    task.progressed.connect(progressed)
    task.done.connect(finished)
    dock.progressBar.setRange(0, 0)
    dock.cancelButton.setEnabled(True)
    dock.show_message(f"Scanning {Path(params['raster']).name} into {params['out']}…")
    return task


def cancel_dock_scan(dock: Any) -> bool:
    """Cancel the dock's running scan (what was written stays); False when none runs."""
    task = getattr(dock, "scan_task", None)
    if task is None:
        return False
    task.cancel()
    return True
