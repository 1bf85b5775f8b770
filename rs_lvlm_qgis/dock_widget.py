"""The RS-LVLM dock panel: choose raster, region and task, ask, watch the answer stream in.

The dock only wires widgets together; the work lives elsewhere: :mod:`region` checks the input
and builds the request, :mod:`engine_client` talks to the engine process, :mod:`result_layers`
turns answers into map layers and :mod:`export` writes them out.  Every failure the analyst can
cause ends as a sentence in ``statusLabel`` (and, for engine restarts, the message bar), never
as a Python traceback dialog.  Object names of the contract widgets are fixed by the design
(``RsLvlmDock``, ``layerCombo``, ``regionCombo``, ``taskCombo``, ``questionEdit``,
``askButton``, ``cancelButton``, ``answerView``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsMessageLog, QgsRectangle, QgsGeometry
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QTextCursor
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import export, region, result_layers, settings
from .engine_client import ENGINE_MISSING, SUPERSEDED, EngineClient, EngineRequest
from .messages import PLACEHOLDERS, describe_engine, failure_text
from .map_tools import PolygonMapTool, RectangleMapTool, make_rubber_band, polygon_geometry_type

LOG_TAG = "RS-LVLM"
REGION_ITEMS = ((region.CANVAS, "Current canvas extent"), (region.RECTANGLE, "Draw a rectangle"),
                (region.POLYGON, "Draw a polygon"),
                (region.FEATURE, "Selected feature of a polygon layer"))
def _layer_filter(name: str) -> Any:
    """A map-layer filter flag across QGIS 3.22 (QgsMapLayerProxyModel) and 3.34+ (Qgis)."""
    modern = getattr(Qgis, "LayerFilter", None)
    if modern is not None and hasattr(modern, name):
        return getattr(modern, name)
    return getattr(QgsMapLayerProxyModel, name)


def answered_by(result: Dict[str, Any]) -> str:
    """The "Answered by <model> on <device>" sentence (parts the engine left out are omitted)."""
    model, device = result_layers.model_name(result), str(result.get("device") or "")
    return "Answered" + (f" by {model}" if model else "") + (f" on {device}" if device else "")


class RsLvlmDock(QDockWidget):
    """The panel; its public methods (``ask``, ``set_region``, ``export``...) are also what
    scripts and tests drive."""

    answered = pyqtSignal(object)  # the ask result dict, after the layers were updated
    askFailed = pyqtSignal(str, str)  # code, message
    engineInfo = pyqtSignal(object)  # the info result dict

    def __init__(self, iface: Any, client: EngineClient, parent: Optional[QWidget] = None) -> None:
        super().__init__("RS-LVLM", parent)
        self.setObjectName("RsLvlmDock")
        self.iface = iface
        self.client = client
        self.canvas = iface.mapCanvas()
        self.region: Optional[region.Region] = None
        self.request: Optional[EngineRequest] = None
        self.last_result: Optional[Dict[str, Any]] = None
        self.last_layers: Dict[str, Any] = {}
        self._meta: Dict[str, Any] = {}
        self._previous_tool = None
        self.rect_tool = RectangleMapTool(self.canvas)
        self.rect_tool.rectangleDrawn.connect(self._on_rectangle)
        self.rect_tool.cancelled.connect(self._restore_tool)
        self.poly_tool = PolygonMapTool(self.canvas)
        self.poly_tool.polygonDrawn.connect(self._on_polygon)
        self.poly_tool.cancelled.connect(self._restore_tool)
        self.band = make_rubber_band(self.canvas, 3)
        self._build()
        self.canvas.destinationCrsChanged.connect(self._show_region)
        self.client.restarted.connect(self._on_engine_restarted)

    # ------------------------------------------------------------------ UI construction
    def _build(self) -> None:
        body = QWidget(self)
        self.setWidget(body)
        self.layerCombo = QgsMapLayerComboBox(body)
        self.layerCombo.setObjectName("layerCombo")
        self.layerCombo.setFilters(_layer_filter("RasterLayer"))
        self.regionCombo = QComboBox(body)
        self.regionCombo.setObjectName("regionCombo")
        for key, label in REGION_ITEMS:
            self.regionCombo.addItem(label, key)
        self.drawButton = QToolButton(body)
        self.drawButton.setObjectName("drawButton")
        self.drawButton.setText("Draw")
        self.drawButton.setToolTip("Draw the region again")
        self.featureLayerCombo = QgsMapLayerComboBox(body)
        self.featureLayerCombo.setObjectName("featureLayerCombo")
        self.featureLayerCombo.setFilters(_layer_filter("PolygonLayer"))
        self.featureLayerCombo.setVisible(False)
        self.taskCombo = QComboBox(body)
        self.taskCombo.setObjectName("taskCombo")
        for label, task in region.TASKS:
            self.taskCombo.addItem(label, task)
        self.questionEdit = QComboBox(body)
        self.questionEdit.setObjectName("questionEdit")
        self.questionEdit.setEditable(True)
        self.questionEdit.setInsertPolicy(QComboBox.NoInsert)
        self.questionEdit.addItems(settings.question_history())
        self.questionEdit.setCurrentText("")
        self.askButton = QPushButton("Ask", body)
        self.askButton.setObjectName("askButton")
        self.askButton.setDefault(True)
        self.cancelButton = QPushButton("Cancel", body)
        self.cancelButton.setObjectName("cancelButton")
        self.cancelButton.setEnabled(False)
        self.settingsButton = QToolButton(body)
        self.settingsButton.setObjectName("settingsButton")
        self.settingsButton.setText("Settings…")
        self.progressBar = QProgressBar(body)
        self.progressBar.setObjectName("progressBar")
        self.progressBar.setRange(0, 1)
        self.progressBar.setValue(0)
        self.statusLabel = QLabel(body)
        self.statusLabel.setObjectName("statusLabel")
        self.statusLabel.setWordWrap(True)
        self.statusLabel.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setupEngineButton = QPushButton("Set up the engine…", body)
        self.setupEngineButton.setObjectName("setupEngineButton")
        self.setupEngineButton.setVisible(False)
        self.answerView = QPlainTextEdit(body)
        self.answerView.setObjectName("answerView")
        self.answerView.setReadOnly(True)
        self.answerView.setPlaceholderText("The answer appears here as it is generated.")
        self.retrievedList = QTreeWidget(body)
        self.retrievedList.setObjectName("retrievedList")
        self.retrievedList.setHeaderLabels(["Level", "Knowledge entry", "Score"])
        self.retrievedList.setRootIsDecorated(False)
        self.retrievedList.setMaximumHeight(140)
        header = self.retrievedList.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.exportAnswersButton = QPushButton("Export answers…", body)
        self.exportAnswersButton.setObjectName("exportAnswersButton")
        self.exportDetectionsButton = QPushButton("Export detections…", body)
        self.exportDetectionsButton.setObjectName("exportDetectionsButton")
        self.deviceLabel = QLabel("Engine: not started", body)
        self.deviceLabel.setObjectName("deviceLabel")
        self.deviceLabel.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Raster", self.layerCombo)
        region_row = QHBoxLayout()
        region_row.addWidget(self.regionCombo, 1)
        region_row.addWidget(self.drawButton)
        form.addRow("Region", region_row)
        form.addRow("", self.featureLayerCombo)
        form.addRow("Task", self.taskCombo)
        form.addRow("Question", self.questionEdit)
        buttons = QHBoxLayout()
        for widget in (self.askButton, self.cancelButton, self.settingsButton):
            buttons.addWidget(widget)
        exports = QHBoxLayout()
        exports.addWidget(self.exportAnswersButton)
        exports.addWidget(self.exportDetectionsButton)
        layout = QVBoxLayout(body)
        layout.addLayout(form)
        layout.addLayout(buttons)
        for widget in (self.progressBar, self.statusLabel, self.setupEngineButton,
                       self.answerView, QLabel("Retrieved knowledge", body), self.retrievedList):
            layout.addWidget(widget)
        layout.addLayout(exports)
        layout.addWidget(self.deviceLabel)

        self.regionCombo.currentIndexChanged.connect(self._on_region_choice)
        self.drawButton.clicked.connect(self.start_drawing)
        self.taskCombo.currentIndexChanged.connect(self._on_task)
        self.askButton.clicked.connect(self.ask)
        self.cancelButton.clicked.connect(self.cancel)
        self.settingsButton.clicked.connect(self._open_settings)
        self.setupEngineButton.clicked.connect(self._open_setup)
        self.exportAnswersButton.clicked.connect(lambda: self.export("answers"))
        self.exportDetectionsButton.clicked.connect(lambda: self.export("detections"))
        self._on_region_choice()
        self._on_task()

    # ------------------------------------------------------------------ messages
    def show_message(self, text: str, level: int = Qgis.Info) -> None:
        """Show a sentence in the panel (red for warnings/errors) and log it."""
        color = {Qgis.Warning: "#b35c00", Qgis.Critical: "#c00000"}.get(level, "")
        self.statusLabel.setStyleSheet(f"color: {color};" if color else "")
        self.statusLabel.setText(text)
        if level != Qgis.Info:
            QgsMessageLog.logMessage(text, LOG_TAG, level)

    def _on_engine_restarted(self, message: str) -> None:
        self.iface.messageBar().pushMessage("RS-LVLM", message, Qgis.Warning, 10)
        self.show_message(message, Qgis.Warning)
        self.refresh_engine_info()

    # ------------------------------------------------------------------ region
    def region_kind(self) -> str:
        return str(self.regionCombo.currentData())

    def _on_region_choice(self, _index: int = 0) -> None:
        kind = self.region_kind()
        self.drawButton.setEnabled(kind in (region.RECTANGLE, region.POLYGON))
        self.featureLayerCombo.setVisible(kind == region.FEATURE)
        if self.region is not None and self.region.kind != kind:
            self.region = None
        self._show_region()
        if kind in (region.RECTANGLE, region.POLYGON) and self.region is None:
            self.start_drawing()

    def start_drawing(self) -> None:
        """Activate the drawing tool for the chosen region kind."""
        tool = self.rect_tool if self.region_kind() == region.RECTANGLE else self.poly_tool
        if self.region_kind() not in (region.RECTANGLE, region.POLYGON):
            return
        current = self.canvas.mapTool()
        if current not in (self.rect_tool, self.poly_tool):
            self._previous_tool = current
        self.canvas.setMapTool(tool)
        self.show_message("Draw the region on the map (polygon: right click to finish).")

    def _restore_tool(self) -> None:
        if self.canvas.mapTool() in (self.rect_tool, self.poly_tool):
            if self._previous_tool is not None:
                self.canvas.setMapTool(self._previous_tool)
            else:
                self.canvas.unsetMapTool(self.canvas.mapTool())

    def _on_rectangle(self, rect: QgsRectangle) -> None:
        self.set_region(region.Region(QgsGeometry.fromRect(rect),
                                      self.canvas.mapSettings().destinationCrs(), region.RECTANGLE))

    def _on_polygon(self, geometry: QgsGeometry) -> None:
        self.set_region(region.Region(geometry, self.canvas.mapSettings().destinationCrs(),
                                      region.POLYGON))

    def set_region(self, value: region.Region) -> None:
        """Use a drawn region (also selects the matching item of the region combo)."""
        index = self.regionCombo.findData(value.kind)
        self.regionCombo.blockSignals(True)
        self.regionCombo.setCurrentIndex(index)
        self.regionCombo.blockSignals(False)
        self.drawButton.setEnabled(value.kind in (region.RECTANGLE, region.POLYGON))
        self.featureLayerCombo.setVisible(value.kind == region.FEATURE)
        self.region = value
        self._show_region()
        self._restore_tool()
        self.show_message("Region set. Choose a task and ask.")

    def _show_region(self) -> None:
        if self.region is None:
            self.band.reset(polygon_geometry_type())
            self.band.hide()
            return
        self.band.setToGeometry(self.region.geometry, self.region.crs)
        self.band.show()

    def current_region(self) -> region.Region:
        """The region the next question is about (raises :class:`region.RegionError`)."""
        kind = self.region_kind()
        if kind == region.CANVAS:
            return region.canvas_region(self.canvas)
        if kind == region.FEATURE:
            return region.selected_feature_region(self.featureLayerCombo.currentLayer())
        if self.region is None:
            raise region.RegionError("Draw a region on the map first (or choose the canvas extent).")
        return self.region

    # ------------------------------------------------------------------ asking
    def _on_task(self, _index: int = 0) -> None:
        self.questionEdit.lineEdit().setPlaceholderText(
            PLACEHOLDERS.get(str(self.taskCombo.currentData()), ""))

    def question(self) -> str:
        return self.questionEdit.currentText().strip()

    def ask(self) -> Optional[EngineRequest]:
        """Check the input and send the question; returns the request or ``None``."""
        task = str(self.taskCombo.currentData())
        question = self.question()
        raster = self.layerCombo.currentLayer()
        try:
            chosen = self.current_region()
            raster_file = region.validate(raster, chosen, task, question)
            fallback = region.to_crs(chosen, raster.crs())
        except region.RegionError as exc:
            self.show_message(str(exc), Qgis.Warning)
            return None
        values = settings.load()
        params = region.ask_params(raster_file, chosen, task, question, values.max_tokens,
                                   values.model_dir, values.device, values.precision)
        if question:
            history = settings.remember_question(question)
            self.questionEdit.blockSignals(True)
            self.questionEdit.clear()
            self.questionEdit.addItems(history)
            self.questionEdit.setCurrentText(question)
            self.questionEdit.blockSignals(False)
        self._meta = {"question": question, "task": self.taskCombo.currentText(),
                      "fallback": fallback}
        self.answerView.clear()
        self.retrievedList.clear()
        self.progressBar.setRange(0, 0)  # busy until the engine reports progress
        self.cancelButton.setEnabled(True)
        self.setupEngineButton.setVisible(False)
        self.show_message("Asking the engine…")
        req = self.client.ask(params, timeout_s=values.timeout_s)
        self.request = req
        req.progress.connect(lambda d, t, m, r=req: self._on_progress(r, d, t, m))
        req.token.connect(lambda text, r=req: self._on_token(r, text))
        req.succeeded.connect(lambda result, r=req: self._on_result(r, result))
        req.failed.connect(lambda code, msg, r=req: self._on_failed(r, code, msg))
        return req

    def cancel(self) -> None:
        if self.request is not None and not self.request.finished:
            self.client.cancel(self.request)
            self.show_message("Cancelling…")

    def _on_progress(self, req: EngineRequest, done: int, total: int, message: str) -> None:
        if req is not self.request:
            return
        if total > 0:
            self.progressBar.setRange(0, total)
            self.progressBar.setValue(min(done, total))
        if message:
            self.show_message(message)

    def _on_token(self, req: EngineRequest, text: str) -> None:
        if req is not self.request:
            return
        cursor = self.answerView.textCursor()
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(text)
        self.answerView.setTextCursor(cursor)

    def _finish_ui(self) -> None:
        self.cancelButton.setEnabled(False)
        self.progressBar.setRange(0, 1)
        self.progressBar.setValue(0)

    def _on_result(self, req: EngineRequest, result: Dict[str, Any]) -> None:
        if req is not self.request:
            return
        self._finish_ui()
        self.progressBar.setValue(1)
        self.last_result = result
        self.answerView.setPlainText(str(result.get("text") or ""))
        for entry in result.get("retrieved") or []:
            if isinstance(entry, dict):
                score = entry.get("score")
                item = QTreeWidgetItem([str(entry.get("level") or ""), str(entry.get("entry") or ""),
                                        f"{score:.2f}" if isinstance(score, (int, float)) else ""])
                item.setToolTip(1, str(entry.get("entry") or ""))
                self.retrievedList.addTopLevelItem(item)
        try:
            added = result_layers.add_result(result, self._meta.get("question", ""),
                                             self._meta.get("task", ""), self._meta.get("fallback"))
        except (RuntimeError, ValueError, TypeError) as exc:
            self.show_message(f"The answer could not be added to the map: {exc}", Qgis.Critical)
            self.askFailed.emit("layers", str(exc))
            return
        self.last_layers = {"answers": added["answers"], "detections": added["detections"]
                            or self.last_layers.get("detections")}
        timing = result.get("timing") or {}
        seconds = (timing.get("total_s") or timing.get("total")) if isinstance(timing, dict) else None
        took = f" in {float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""
        boxes = f"; {added['boxes']} box(es) added to '{result_layers.DETECTIONS_LAYER}'" \
            if added["boxes"] else ""
        self.show_message(f"{answered_by(result)}{took}{boxes}.")
        self.answered.emit(result)

    def _on_failed(self, req: EngineRequest, code: str, message: str) -> None:
        if req is not self.request or code == SUPERSEDED:
            return
        self._finish_ui()
        text = failure_text(code, message)
        if code == ENGINE_MISSING:
            self.setupEngineButton.setVisible(True)
            self.deviceLabel.setText("Engine: not set up")
        self.show_message(text, Qgis.Info if code == "cancelled" else Qgis.Warning)
        self.askFailed.emit(code, message)

    # ------------------------------------------------------------------ engine info
    def refresh_engine_info(self) -> EngineRequest:
        """Ask the engine which device and model it uses and show it in ``deviceLabel``."""
        values = settings.load()
        params: Dict[str, Any] = {}
        if values.model_dir:
            params["model"] = values.model_dir
        if values.device != "auto":
            params["device"] = values.device
        req = self.client.request("info", params, timeout_s=180)
        self.deviceLabel.setText("Engine: starting…")
        req.succeeded.connect(self._on_info)
        req.failed.connect(self._on_info_failed)
        return req

    def _on_info(self, info: Dict[str, Any]) -> None:
        self.deviceLabel.setText(describe_engine(info))
        self.setupEngineButton.setVisible(False)
        self.engineInfo.emit(info)

    def _on_info_failed(self, code: str, message: str) -> None:
        if code == ENGINE_MISSING:
            self.setupEngineButton.setVisible(True)
            self.deviceLabel.setText("Engine: not set up")
            self.show_message(message, Qgis.Warning)
        else:
            self.deviceLabel.setText(f"Engine: unavailable ({code})")
            self.show_message(f"The engine is not working: {message}", Qgis.Warning)

    # ------------------------------------------------------------------ export & dialogs
    def export(self, kind: str, path: Optional[str] = None) -> Optional[str]:
        """Export the answers or detections layer; asks for a file name when none is given."""
        name = result_layers.ANSWERS_LAYER if kind == "answers" else result_layers.DETECTIONS_LAYER
        layer = self.last_layers.get(kind) or result_layers.find_layer(name)
        if layer is None:
            self.show_message(f"There is no '{name}' layer to export yet.", Qgis.Warning)
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, f"Export {name}", "", export.FILE_FILTER)
            if not path:
                return None
        try:
            written = export.export_layer(layer, path)
        except export.ExportError as exc:
            self.show_message(str(exc), Qgis.Warning)
            return None
        self.show_message(f"Exported '{name}' to {written}.")
        return written

    def _open_settings(self) -> None:
        from .settings_dialog import SettingsDialog  # pylint: disable=import-outside-toplevel

        if SettingsDialog(self).exec_():
            self.refresh_engine_info()

    def _open_setup(self) -> None:
        from .settings_dialog import EngineSetupDialog  # pylint: disable=import-outside-toplevel

        EngineSetupDialog(self).exec_()
        self.refresh_engine_info()

    def shutdown(self) -> None:
        """Remove map tools and rubber bands (called when the plugin unloads)."""
        self._restore_tool()
        for item in (self.band, self.rect_tool.band, self.poly_tool.band):
            self.canvas.scene().removeItem(item)
