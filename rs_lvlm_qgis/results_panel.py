"""The part of the dock under the answer: warnings, boxes, the answer history and the actions
an analyst reaches for next (zoom to, attribute table, score threshold).

Why highlights are rubber bands and not layer selections: a selection changes the analyst's
project state (and the "Selected feature" region choice reads selections), a rubber band is
only a view.  The answer region is drawn in blue, the boxes of the shown answer in red and the
box under the mouse in yellow, all apart from the orange region being drawn.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QSlider,
    QToolButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import result_layers
from .conversation import Turn
from .map_tools import polygon_geometry_type
from .region import crs_from_engine

ANSWER_BAND_COLOR = QColor(30, 110, 220, 230)
BOXES_BAND_COLOR = QColor(230, 0, 70, 200)
HOVER_BAND_COLOR = QColor(255, 210, 0, 255)
WARNING_STYLE = "color: #8a4b00; background: #fff3d6; padding: 3px;"


def _band(canvas: Any, color: QColor, width: int) -> QgsRubberBand:
    band = QgsRubberBand(canvas, polygon_geometry_type())
    band.setStrokeColor(color)
    band.setFillColor(QColor(color.red(), color.green(), color.blue(), 30))
    band.setWidth(width)
    return band


def score_filter(threshold: float) -> str:
    """The detections layer's subset string for a minimum score ("" shows all)."""
    return f"\"score\" >= {threshold:.2f}" if threshold > 0 else ""


class ResultsPanel(QWidget):
    """Warnings, the boxes of the shown answer, the answer history and result actions."""

    turnChosen = pyqtSignal(object)  # the Turn clicked in the history list

    def __init__(self, iface: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.turns: List[Turn] = []
        self.shown: Optional[Turn] = None
        self.layers: Dict[str, Optional[QgsVectorLayer]] = {"answers": None, "detections": None}
        self.answer_id: Optional[int] = None
        self.answer_band = _band(self.canvas, ANSWER_BAND_COLOR, 2)
        self.boxes_band = _band(self.canvas, BOXES_BAND_COLOR, 1)
        self.hover_band = _band(self.canvas, HOVER_BAND_COLOR, 3)
        self._build()

    def _build(self) -> None:
        self.warningsLabel = QLabel(self)
        self.warningsLabel.setObjectName("warningsLabel")
        self.warningsLabel.setWordWrap(True)
        self.warningsLabel.setStyleSheet(WARNING_STYLE)
        self.warningsLabel.setVisible(False)
        self.boxesList = QTreeWidget(self)
        self.boxesList.setObjectName("boxesList")
        self.boxesList.setHeaderLabels(["Object", "Score"])
        self.boxesList.setRootIsDecorated(False)
        self.boxesList.setMouseTracking(True)
        self.boxesList.setMaximumHeight(110)
        self.boxesList.setVisible(False)  # shown when an answer has boxes
        header = self.boxesList.header()
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        header.setStretchLastSection(False)
        header.setSectionResizeMode(1, QHeaderView.ResizeToContents)
        self.boxesList.itemEntered.connect(lambda item, _col: self.highlight_box(item))
        self.boxesList.currentItemChanged.connect(lambda item, _old: self.highlight_box(item))
        self.historyList = QListWidget(self)
        self.historyList.setObjectName("historyList")
        self.historyList.setMaximumHeight(110)
        self.historyList.setToolTip("Earlier answers: click one to show its region and boxes")
        self.historyList.setTextElideMode(Qt.ElideRight)
        self.historyList.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.historyList.itemClicked.connect(self._on_history_item)
        self.newConversationButton = QToolButton(self)
        self.newConversationButton.setObjectName("newConversationButton")
        self.newConversationButton.setText("New chat")
        self.newConversationButton.setToolTip(
            "Ask the next question without the earlier answers on this region")
        self.conversationLabel = QLabel(self)
        self.conversationLabel.setObjectName("conversationLabel")
        self.zoomAnswerButton = self._tool("zoomAnswerButton", "Zoom to", self.zoom_to_answer,
                                           "Zoom the map to the last answer's region")
        self.answerTableButton = self._tool("answerTableButton", "Table",
                                            self.open_answer_table,
                                            "Open the answers table on the last answer")
        self.zoomDetectionsButton = self._tool("zoomDetectionsButton", "Zoom to",
                                               self.zoom_to_detections,
                                               "Zoom the map to the detections layer")
        self.detectionsTableButton = self._tool("detectionsTableButton", "Table",
                                                self.open_detections_table,
                                                "Open the detections layer's attribute table")
        self.scoreSlider = QSlider(Qt.Horizontal, self)
        self.scoreSlider.setObjectName("scoreSlider")
        self.scoreSlider.setRange(0, 100)
        self.scoreSlider.setToolTip("Hide detections below this score")
        self.scoreLabel = QLabel("Min score 0.00", self)
        self.scoreLabel.setObjectName("scoreLabel")
        self.scoreSlider.valueChanged.connect(lambda v: self.set_score_threshold(v / 100.0))

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.warningsLabel)
        layout.addWidget(self.boxesList)
        for title, widgets in (("Last answer", (self.zoomAnswerButton, self.answerTableButton)),
                               ("Detections", (self.zoomDetectionsButton,
                                               self.detectionsTableButton))):
            row = QHBoxLayout()
            row.addWidget(QLabel(title, self))
            row.addStretch(1)
            for widget in widgets:
                row.addWidget(widget)
            layout.addLayout(row)
        score_row = QHBoxLayout()
        score_row.addWidget(self.scoreLabel)
        score_row.addWidget(self.scoreSlider, 1)
        layout.addLayout(score_row)
        history_row = QHBoxLayout()
        history_row.addWidget(QLabel("Answers", self))
        history_row.addWidget(self.conversationLabel, 1)
        history_row.addWidget(self.newConversationButton)
        layout.addLayout(history_row)
        layout.addWidget(self.historyList)
        self._update_buttons()

    def _tool(self, name: str, text: str, slot: Any, tip: str) -> QToolButton:
        button = QToolButton(self)
        button.setObjectName(name)
        button.setText(text)
        button.setToolTip(tip)
        button.clicked.connect(slot)
        return button

    def _update_buttons(self) -> None:
        has_answer = self.layers["answers"] is not None and self.answer_id is not None
        has_detections = self.layers["detections"] is not None
        for button in (self.zoomAnswerButton, self.answerTableButton):
            button.setEnabled(has_answer)
        for button in (self.zoomDetectionsButton, self.detectionsTableButton, self.scoreSlider):
            button.setEnabled(has_detections)

    # ------------------------------------------------------------------ warnings
    def show_warnings(self, warnings: List[str]) -> None:
        """Show the engine's warnings of the last answer (hidden when there are none)."""
        self.warningsLabel.setText("\n".join("⚠ " + w for w in warnings))
        self.warningsLabel.setVisible(bool(warnings))

    # ------------------------------------------------------------------ answers
    def add_turn(self, turn: Turn, layers: Dict[str, Any], answer_id: Optional[int]) -> None:
        """A new answer: remember it in the history and show its region and boxes."""
        self.turns.append(turn)
        item = QListWidgetItem(turn.title())
        item.setToolTip(turn.answer)
        item.setData(Qt.UserRole, len(self.turns) - 1)
        self.historyList.addItem(item)
        self.historyList.setCurrentItem(item)
        self.layers["answers"] = layers.get("answers") or self.layers["answers"]
        if layers.get("detections") is not None:
            self.layers["detections"] = layers["detections"]
            self.set_score_threshold(self.scoreSlider.value() / 100.0)
        self.answer_id = answer_id
        self._update_buttons()
        self.show_turn(turn)

    def set_conversation_size(self, turns: int) -> None:
        """Say how many earlier turns the next question on this region will carry."""
        self.conversationLabel.setText(f"({turns} on this region)" if turns else "")

    def _on_history_item(self, item: QListWidgetItem) -> None:
        index = item.data(Qt.UserRole)
        if isinstance(index, int) and 0 <= index < len(self.turns):
            self.show_turn(self.turns[index])
            self.turnChosen.emit(self.turns[index])

    def _to_canvas(self, geometry: QgsGeometry, crs: QgsCoordinateReferenceSystem) -> QgsGeometry:
        """``geometry`` in the canvas CRS (the bands draw in canvas coordinates)."""
        geometry = QgsGeometry(geometry)
        target = self.canvas.mapSettings().destinationCrs()
        if crs.isValid() and target.isValid() and crs != target:
            try:
                geometry.transform(QgsCoordinateTransform(crs, target, QgsProject.instance()))
            except QgsCsException:
                return QgsGeometry()
        return geometry

    def show_turn(self, turn: Turn) -> None:
        """List a turn's boxes and outline its region (blue) and boxes (red) on the map."""
        self.shown = turn
        crs = crs_from_engine(str(turn.result.get("crs") or ""))
        extent = turn.result.get("extent") or {}
        wkt = extent.get("wkt") if isinstance(extent, dict) else None
        self.answer_band.reset(polygon_geometry_type())
        if wkt:
            self.answer_band.setToGeometry(self._to_canvas(QgsGeometry.fromWkt(str(wkt)), crs))
        self.boxes_band.reset(polygon_geometry_type())
        self.hover_band.reset(polygon_geometry_type())
        self.boxesList.clear()
        for box in turn.boxes:
            score = box.get("score")
            item = QTreeWidgetItem([box["label"], f"{score:.2f}" if score is not None else ""])
            item.setData(0, Qt.UserRole, box["wkt"])
            self.boxesList.addTopLevelItem(item)
            geometry = self._to_canvas(QgsGeometry.fromWkt(box["wkt"]), crs)
            if not geometry.isEmpty():
                self.boxes_band.addGeometry(geometry)
        self.boxesList.setVisible(bool(turn.boxes))
        self._grey_out_low_scores()

    def highlight_box(self, item: Optional[QTreeWidgetItem]) -> None:
        """Outline one box in yellow (the box under the mouse, or the clicked one)."""
        self.hover_band.reset(polygon_geometry_type())
        if item is None or self.shown is None:
            return
        crs = crs_from_engine(str(self.shown.result.get("crs") or ""))
        geometry = self._to_canvas(QgsGeometry.fromWkt(str(item.data(0, Qt.UserRole))), crs)
        if not geometry.isEmpty():
            self.hover_band.setToGeometry(geometry)

    # ------------------------------------------------------------------ actions
    def _zoom(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        if extent.isEmpty() and extent.width() == 0:
            return
        box = self._to_canvas(QgsGeometry.fromRect(extent), crs).boundingBox()
        box.scale(1.2)
        self.canvas.setExtent(box)
        self.canvas.refresh()

    def zoom_to_answer(self) -> None:
        """Zoom the map to the region of the last answer."""
        layer, fid = self.layers["answers"], self.answer_id
        if layer is None or fid is None:
            return
        feature = layer.getFeature(fid)
        if feature.hasGeometry():
            self._zoom(feature.geometry().boundingBox(), layer.crs())

    def zoom_to_detections(self) -> None:
        """Zoom the map to the detections (those above the score threshold)."""
        layer = self.layers["detections"]
        if layer is not None:
            layer.updateExtents()
            self._zoom(layer.extent(), layer.crs())

    def _attribute_table(self, layer: Optional[QgsVectorLayer], expression: str = "") -> bool:
        show = getattr(self.iface, "showAttributeTable", None)
        if layer is None or show is None:
            return False
        show(layer, expression)
        return True

    def open_answer_table(self) -> bool:
        """Open the answers table filtered to the last answer."""
        fid = self.answer_id
        return self._attribute_table(self.layers["answers"], f"$id = {fid}" if fid is not None else "")

    def open_detections_table(self) -> bool:
        """Open the detections layer's attribute table."""
        return self._attribute_table(self.layers["detections"])

    def set_score_threshold(self, threshold: float) -> None:
        """Show only detections scoring at least ``threshold``, on every detections layer."""
        threshold = max(0.0, min(1.0, float(threshold)))
        self.scoreLabel.setText(f"Min score {threshold:.2f}")
        value = round(threshold * 100)
        if self.scoreSlider.value() != value:
            self.scoreSlider.blockSignals(True)
            self.scoreSlider.setValue(value)
            self.scoreSlider.blockSignals(False)
        for layer in QgsProject.instance().mapLayersByName(result_layers.DETECTIONS_LAYER):
            if isinstance(layer, QgsVectorLayer) and layer.subsetString() != score_filter(threshold):
                layer.setSubsetString(score_filter(threshold))
                layer.triggerRepaint()
        self._grey_out_low_scores()

    def _grey_out_low_scores(self) -> None:
        threshold = self.scoreSlider.value() / 100.0
        for i in range(self.boxesList.topLevelItemCount()):
            item = self.boxesList.topLevelItem(i)
            try:
                low = float(item.text(1)) < threshold
            except ValueError:
                low = False
            for column in (0, 1):
                item.setForeground(column, QColor("#999999") if low else QColor("#000000"))

    def shutdown(self) -> None:
        """Remove the rubber bands from the canvas (the plugin unloads)."""
        for band in (self.answer_band, self.boxes_band, self.hover_band):
            self.canvas.scene().removeItem(band)
