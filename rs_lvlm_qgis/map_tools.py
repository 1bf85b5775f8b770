"""Map tools for drawing the asked region on the canvas.

Both tools work in canvas (map) coordinates and emit a geometry in the canvas CRS; the dock
keeps the finished region in its own rubber band, so the tools' rubber bands are only the
"being drawn" preview and are cleared as soon as a drawing ends or is abandoned.
"""
from __future__ import annotations

from typing import List, Optional

from qgis.core import Qgis, QgsGeometry, QgsPointXY, QgsRectangle
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

_DRAW_COLOR = QColor(255, 128, 0, 200)
_FILL_COLOR = QColor(255, 128, 0, 40)


def polygon_geometry_type() -> object:
    """The polygon geometry type enum across QGIS 3.22 (QgsWkbTypes) and 3.30+ (Qgis)."""
    geometry_type = getattr(Qgis, "GeometryType", None)
    if geometry_type is not None and hasattr(geometry_type, "Polygon"):
        return geometry_type.Polygon
    from qgis.core import QgsWkbTypes  # pylint: disable=import-outside-toplevel
    return QgsWkbTypes.PolygonGeometry


def make_rubber_band(canvas: QgsMapCanvas, width: int = 2) -> QgsRubberBand:
    """A polygon rubber band in the plugin's colours."""
    band = QgsRubberBand(canvas, polygon_geometry_type())
    band.setStrokeColor(_DRAW_COLOR)
    band.setFillColor(_FILL_COLOR)
    band.setWidth(width)
    return band


class RectangleMapTool(QgsMapTool):
    """Press, drag, release: emits ``rectangleDrawn`` with the rectangle in map units."""

    rectangleDrawn = pyqtSignal(QgsRectangle)
    cancelled = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.band = make_rubber_band(canvas)
        self._start: Optional[QgsPointXY] = None
        self.setCursor(Qt.CrossCursor)

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 (Qt API)
        if event.button() == Qt.LeftButton:
            self._start = self.toMapCoordinates(event.pos())
            self.band.reset(polygon_geometry_type())

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self._start is not None:
            end = self.toMapCoordinates(event.pos())
            self.band.setToGeometry(QgsGeometry.fromRect(QgsRectangle(self._start, end)), None)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if event.button() != Qt.LeftButton or self._start is None:
            return
        rect = QgsRectangle(self._start, self.toMapCoordinates(event.pos()))
        self._start = None
        self.band.reset(polygon_geometry_type())
        if rect.width() > 0 and rect.height() > 0:
            self.rectangleDrawn.emit(rect)
        else:  # a click without dragging is not a region
            self.cancelled.emit()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() == Qt.Key_Escape:
            self._start = None
            self.band.reset(polygon_geometry_type())
            self.cancelled.emit()

    def deactivate(self) -> None:
        self._start = None
        self.band.reset(polygon_geometry_type())
        super().deactivate()


class PolygonMapTool(QgsMapTool):
    """Left click adds a vertex, right click (or double click) closes the polygon, Escape
    abandons it, Backspace removes the last vertex.  Emits ``polygonDrawn``."""

    polygonDrawn = pyqtSignal(QgsGeometry)
    cancelled = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.band = make_rubber_band(canvas)
        self._points: List[QgsPointXY] = []
        self.setCursor(Qt.CrossCursor)

    def _redraw(self, hover: Optional[QgsPointXY] = None) -> None:
        points = self._points + ([hover] if hover is not None else [])
        self.band.reset(polygon_geometry_type())
        for i, point in enumerate(points):
            self.band.addPoint(point, i == len(points) - 1)

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if event.button() == Qt.LeftButton:
            self._points.append(self.toMapCoordinates(event.pos()))
            self._redraw()
        elif event.button() == Qt.RightButton:
            self.finish()

    def canvasDoubleClickEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if event.button() == Qt.LeftButton:
            self.finish()

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self._points:
            self._redraw(self.toMapCoordinates(event.pos()))

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() == Qt.Key_Escape:
            self.reset()
            self.cancelled.emit()
        elif event.key() == Qt.Key_Backspace and self._points:
            self._points.pop()
            self._redraw()

    def finish(self) -> None:
        """Close the polygon; fewer than three distinct vertices is no polygon."""
        points = []
        for point in self._points:
            if not points or point != points[-1]:
                points.append(point)
        self.reset()
        if len(points) >= 3:
            geometry = QgsGeometry.fromPolygonXY([points + [points[0]]])
            if geometry.area() > 0:
                self.polygonDrawn.emit(geometry)
                return
        self.cancelled.emit()

    def reset(self) -> None:
        self._points = []
        self.band.reset(polygon_geometry_type())

    def deactivate(self) -> None:
        self.reset()
        super().deactivate()
