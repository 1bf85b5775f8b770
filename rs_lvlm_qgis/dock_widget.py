"""The RS-LVLM dock panel: choose raster, region and task, ask, watch the answer stream in.

The dock only wires widgets together; the work lives elsewhere: :mod:`region` checks the input,
:mod:`protocol` builds the request (task ids, follow-up ``history``), :mod:`engine_client` talks
to the engine process, :mod:`answer_text` makes answers readable, :mod:`result_layers` turns
them into map layers, :mod:`results_panel` shows warnings, boxes and the answer history, and
:mod:`export` writes layers out.  Every failure the analyst can
cause ends as a sentence in ``statusLabel`` (and, for engine restarts, the message bar), never
as a Python traceback dialog.  Object names of the contract widgets are fixed by the design
(``RsLvlmDock``, ``layerCombo``, ``regionCombo``, ``taskCombo``, ``questionEdit``,
``askButton``, ``cancelButton``, ``answerView``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from qgis.core import (Qgis, QgsGeometry, QgsMapLayerProxyModel, QgsMessageLog, QgsProject,
                       QgsRectangle)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QTextCursor
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import answer_text, protocol, region, result_layers, scan_task, settings
from .conversation import Conversation, Turn, region_key
from .export_bar import ExportBar
from .engine_client import ENGINE_MISSING, SUPERSEDED, EngineClient, EngineRequest
from .engine_status import EngineStatus
from .messages import answered_by, failure_text, result_warnings
from .question_box import QuestionBox
from .results_panel import ResultsPanel
from .retrieved_view import RetrievedList
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
        self._stream = ""  # the raw tokens of the answer being generated
        self.conversation = Conversation()
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
        scroll = QScrollArea(self)  # a short screen scrolls the panel instead of squashing it
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(body)
        self.setWidget(scroll)
        self.layerCombo = QgsMapLayerComboBox(body)
        self.layerCombo.setObjectName("layerCombo")
        self.layerCombo.setFilters(_layer_filter("RasterLayer"))
        self.regionCombo = QComboBox(body)
        self.regionCombo.setObjectName("regionCombo")
        self.regionCombo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.regionCombo.setMinimumContentsLength(10)  # long item texts must not widen the dock
        for key, label in REGION_ITEMS + scan_task.REGION_CHOICES:  # the last two: tiled scans
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
        for row in protocol.TASKS:  # people read the label, the engine gets the id
            self.taskCombo.addItem(row.label, row.id)
        self.questionEdit = QuestionBox(body)
        self.questionEdit.lineEdit().returnPressed.connect(self.ask)
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
        self.progressBar.setTextVisible(False)  # idle: an empty bar, not "0 %"
        self.statusLabel = QLabel(body)
        self.statusLabel.setObjectName("statusLabel")
        self.statusLabel.setWordWrap(True)
        self.statusLabel.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.engine_status = EngineStatus(self.client, body)
        self.engine_status.info.connect(self.engineInfo.emit)
        self.engine_status.message.connect(self.show_message)
        self.deviceLabel = self.engine_status.deviceLabel
        self.setupEngineButton = self.engine_status.setupEngineButton
        self.answerView = QPlainTextEdit(body)
        self.answerView.setObjectName("answerView")
        self.answerView.setReadOnly(True)
        self.answerView.setPlaceholderText("The answer appears here as it is generated.")
        self.answerView.setMaximumHeight(110)
        self.retrievedList = RetrievedList(body)
        self.retrievedList.entryOpened.connect(lambda entry: self.open_knowledge(entry))
        self.results = ResultsPanel(self.iface, body)
        self.results.turnChosen.connect(self._on_turn_chosen)
        self.results.newConversationButton.clicked.connect(self.new_conversation)
        self.knowledgeButton = QToolButton(body)
        self.knowledgeButton.setObjectName("knowledgeButton")
        self.knowledgeButton.setText("Knowledge base…")
        self.knowledgeButton.clicked.connect(lambda: self.open_knowledge())
        self.exports = ExportBar(self, body)

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
        knowledge_row = QHBoxLayout()
        knowledge_row.addWidget(QLabel("Retrieved knowledge", body), 1)
        knowledge_row.addWidget(self.knowledgeButton)
        layout = QVBoxLayout(body)
        layout.addLayout(form)
        layout.addLayout(buttons)
        for widget in (self.progressBar, self.statusLabel, self.setupEngineButton,
                       self.answerView, self.results):
            layout.addWidget(widget)
        layout.addLayout(knowledge_row)
        layout.addWidget(self.retrievedList)
        layout.addWidget(self.exports)
        layout.addWidget(self.deviceLabel)

        self.regionCombo.currentIndexChanged.connect(self._on_region_choice)
        self.drawButton.clicked.connect(self.start_drawing)
        self.taskCombo.currentIndexChanged.connect(self._on_task)
        self.askButton.clicked.connect(self.ask)
        self.cancelButton.clicked.connect(self.cancel)
        self.settingsButton.clicked.connect(self._open_settings)
        self.setupEngineButton.clicked.connect(self._open_setup)
        self._on_region_choice()
        self._on_task()
        QgsProject.instance().layersAdded.connect(self._avoid_own_feature_layer)
        self._avoid_own_feature_layer()

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

    def _avoid_own_feature_layer(self, _layers: Any = None) -> None:
        region.prefer_analyst_layer(self.featureLayerCombo, result_layers.GROUP_NAME + " ")

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
        task_id = str(self.taskCombo.currentData())
        self.questionEdit.lineEdit().setPlaceholderText(
            protocol.task(task_id).placeholder if task_id in protocol.TASK_IDS else "")

    def asked_raster(self) -> str:
        """The raster file of the last question ("" before any)."""
        return str(self._meta.get("raster") or "")

    def question(self) -> str:
        return self.questionEdit.question()

    def ask(self) -> Optional[EngineRequest]:
        """Check the input and send the question; returns the request or ``None``."""
        task = str(self.taskCombo.currentData())
        if task not in protocol.TASK_IDS:  # no task chosen (a script set the index to -1)
            self.show_message("Choose a task first.", Qgis.Warning)
            return None
        if self.region_kind() in scan_task.SCAN_KINDS:  # a tiled scan runs as a task of its own
            scan_task.start_dock_scan(self)
            return None
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
        params = protocol.ask_params(raster_file, chosen, task, question, values.max_tokens,
                                     values.model_dir, values.device, values.precision)
        history = self.conversation.history(region_key(params))
        if history:  # a follow-up on the same region carries the earlier turns
            params["history"] = history
        self.questionEdit.remember(question)
        self._meta = {"question": question, "task": task, "fallback": fallback,
                      "params": params, "raster": raster_file}
        self._stream = ""
        self.answerView.clear()
        self.retrievedList.clear()
        self.results.show_warnings([])
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
        if scan_task.cancel_dock_scan(self):
            self.show_message("Cancelling the scan (what it wrote is kept)…")
            return
        if self.request is not None and not self.request.finished:
            self.client.cancel(self.request)
            self.show_message("Cancelling…")

    def _on_progress(self, req: EngineRequest, done: int, total: int, message: str) -> None:
        if req is not self.request:
            return
        self.show_progress(done, total, message)

    def show_progress(self, done: int, total: int, message: str = "") -> None:
        """The progress bar (shown only once there is a total) and the status line."""
        if total > 0:
            self.progressBar.setTextVisible(True)
            self.progressBar.setRange(0, total)
            self.progressBar.setValue(min(done, total))
        if message:
            self.show_message(message)

    def _on_token(self, req: EngineRequest, text: str) -> None:
        if req is not self.request:
            return
        self._stream += text
        shown = answer_text.strip_boxes(self._stream, streaming=True)
        if shown != self.answerView.toPlainText():
            self.answerView.setPlainText(shown)
            self.answerView.moveCursor(QTextCursor.End)

    def _finish_ui(self) -> None:
        self.cancelButton.setEnabled(False)
        self.progressBar.setRange(0, 1)
        self.progressBar.setValue(0)
        self.progressBar.setTextVisible(False)

    def _on_result(self, req: EngineRequest, result: Dict[str, Any]) -> None:
        if req is not self.request:
            return
        self._finish_ui()
        self.last_result = result
        turn = Turn.from_result(self._meta.get("params") or {}, result)
        self.answerView.setPlainText(turn.answer)
        self.retrievedList.show_result(result)
        warnings = result_warnings(result)
        self.results.show_warnings(warnings)
        for warning in warnings:
            self.iface.messageBar().pushMessage("RS-LVLM", warning, Qgis.Warning, 10)
        try:
            added = result_layers.add_result(result, self._meta.get("question", ""),
                                             self._meta.get("task", ""), self._meta.get("fallback"),
                                             self._meta.get("raster", ""))
        except (RuntimeError, ValueError, TypeError) as exc:
            self.show_message(f"The answer could not be added to the map: {exc}", Qgis.Critical)
            self.askFailed.emit("layers", str(exc))
            return
        self.last_layers = {"answers": added["answers"], "detections": added["detections"]
                            or self.last_layers.get("detections")}
        self.exports.keep_in_project()
        self.conversation.add(turn)
        self.results.add_turn(turn, self.last_layers, added.get("answer_id"))
        self.results.set_conversation_size(len(self.conversation.current(turn.key)))
        timing = result.get("timing") or {}
        seconds = (timing.get("total_s") or timing.get("total")) if isinstance(timing, dict) else None
        took = f" in {float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""
        boxes = f"; {added['boxes']} box(es) added to '{result_layers.DETECTIONS_LAYER}'" \
            if added["boxes"] else ""
        self.show_message(f"{answered_by(result)}{took}{boxes}."
                          + (" See the warnings above." if warnings else ""),
                          Qgis.Warning if warnings else Qgis.Info)
        self.answered.emit(result)

    def _on_turn_chosen(self, turn: Turn) -> None:
        """An earlier answer clicked in the history: show its text and knowledge again."""
        self.answerView.setPlainText(turn.answer)
        self.retrievedList.show_result(turn.result)
        self.results.show_warnings(result_warnings(turn.result))

    def new_conversation(self) -> None:
        """The next question on this region is sent without the earlier turns."""
        self.conversation.reset()
        self.results.set_conversation_size(0)
        self.show_message("New conversation: the next question starts afresh.")

    def _on_failed(self, req: EngineRequest, code: str, message: str) -> None:
        if req is not self.request or code == SUPERSEDED:
            return
        self._finish_ui()
        text = failure_text(code, message)
        if code == ENGINE_MISSING:
            self.engine_status.on_failure(code, message, report=False)
        self.show_message(text, Qgis.Info if code == "cancelled" else Qgis.Warning)
        self.askFailed.emit(code, message)

    # ------------------------------------------------------------------ engine info
    def refresh_engine_info(self) -> EngineRequest:
        """Ask the engine which device and model it uses and show it in ``deviceLabel``."""
        return self.engine_status.refresh()

    # ------------------------------------------------------------------ export & dialogs
    def export(self, kind: str, path: Optional[str] = None) -> Optional[str]:
        """Export the answers or detections layer (see :class:`export_bar.ExportBar`)."""
        return self.exports.export(kind, path)

    def open_knowledge(self, entry: str = "", modal: bool = True) -> Any:
        """The knowledge-base dialog, showing ``entry`` (an id or name) when given."""
        from .knowledge_dialog import KnowledgeDialog  # pylint: disable=import-outside-toplevel

        dialog = KnowledgeDialog(self)
        if entry:
            dialog.show_entry(entry)
        if modal:
            dialog.exec_()
        return dialog

    def _open_settings(self) -> None:
        from .settings_dialog import SettingsDialog  # pylint: disable=import-outside-toplevel

        if SettingsDialog(self).exec_():
            self.refresh_engine_info()

    def _open_setup(self) -> None:
        from .engine_setup_dialog import EngineSetupDialog  # pylint: disable=import-outside-toplevel

        EngineSetupDialog(self).exec_()
        self.refresh_engine_info()

    def shutdown(self) -> None:
        """Remove map tools and rubber bands (called when the plugin unloads)."""
        self._restore_tool()
        try:
            QgsProject.instance().layersAdded.disconnect(self._avoid_own_feature_layer)
        except TypeError:
            pass
        self.results.shutdown()
        for item in (self.band, self.rect_tool.band, self.poly_tool.band):
            self.canvas.scene().removeItem(item)
