"""Answers and detections as memory layers in the project.

Why layers and not a report: the analyst's answers become map data that can be styled, edited,
joined and exported like any other.  Each result is appended (nothing is overwritten) to:

* ``RS-LVLM answers``: the asked region as a polygon with task id, question, the readable
  answer, the model's raw output (``raw``, box syntax and all), the raster it was asked about,
  model and time;
* ``RS-LVLM detections``: one polygon per grounded box with label, score, question, raster,
  model and time.

Labels are kept short and do not stack: only the latest answer on a region is labelled (older
ones stay in the table), long answers are cut and wrapped, and the two layers use different
colours from each other and from the orange region being drawn.

Both are created in the result's CRS (the raster's, as the engine reports it), so coordinates
are stored exactly as computed; QGIS reprojects on the fly for display.  If a later answer comes
in another CRS (another raster), a second layer of the same name in that CRS is used rather
than silently reprojecting.  Layers live in a layer-tree group ``RS-LVLM``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsPalLayerSettings,
    QgsProject,
    QgsSingleSymbolRenderer,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QDateTime, Qt
from qgis.PyQt.QtGui import QColor

from . import answer_text
from .messages import model_name
from .region import crs_from_engine

ANSWERS_LAYER = "RS-LVLM answers"
DETECTIONS_LAYER = "RS-LVLM detections"
GROUP_NAME = "RS-LVLM"

# Memory-provider field specs.  Widths are explicit so a Shapefile export keeps full values up
# to 254 characters instead of OGR's 80-character default for unsized strings.
ANSWER_FIELDS = ("task:string(16)", "question:string(254)", "answer:string(254)",
                 "raw:string(254)", "raster:string(254)", "model:string(80)", "created:string(32)")
DETECTION_FIELDS = ("label:string(80)", "score:double", "question:string(254)",
                    "raster:string(254)", "model:string(80)", "created:string(32)")
ANSWER_COLOR = "30,110,220"  # blue: apart from the orange region being drawn
DETECTION_COLOR = "230,0,70"
# Answers are labelled with their first 60 characters, and only the newest answer on a region
# (see label_newest): repeated questions about one region would stack their labels otherwise.
ANSWER_TEXT = "if(length(\"answer\") > 60, left(\"answer\", 59) || '…', \"answer\")"
DETECTION_LABEL = "\"label\" || ' ' || format_number(\"score\", 2)"


def _group() -> QgsLayerTreeGroup:
    root = QgsProject.instance().layerTreeRoot()
    group = root.findGroup(GROUP_NAME)
    return group if group is not None else root.insertGroup(0, GROUP_NAME)


def _style(layer: QgsVectorLayer, outline: str, fill: str, label_expression: str) -> None:
    symbol = QgsFillSymbol.createSimple({"color": fill, "outline_color": outline,
                                         "outline_width": "0.6", "outline_style": "solid"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    text = QgsTextFormat()
    text.setSize(9)
    text.setColor(QColor(*[int(part) for part in outline.split(",")[:3]]))
    buffer = text.buffer()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor(Qt.white))
    text.setBuffer(buffer)
    settings = QgsPalLayerSettings()
    settings.fieldName = label_expression
    settings.isExpression = True
    settings.setFormat(text)
    settings.autoWrapLength = 30  # characters per line: a long answer is a block, not a ribbon
    settings.displayAll = False  # overlapping labels are dropped, never drawn on top of each other
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)


def find_layers(name: str) -> List[QgsVectorLayer]:
    """Every result layer of that name in the project (one per CRS)."""
    return [layer for layer in QgsProject.instance().mapLayersByName(name)
            if isinstance(layer, QgsVectorLayer)]


def find_layer(name: str, crs: Optional[QgsCoordinateReferenceSystem] = None
               ) -> Optional[QgsVectorLayer]:
    """The project's result layer of that name (in that CRS, if given)."""
    for layer in QgsProject.instance().mapLayersByName(name):
        if isinstance(layer, QgsVectorLayer) and (crs is None or layer.crs() == crs):
            return layer
    return None


def _layer(name: str, crs: QgsCoordinateReferenceSystem, fields: tuple, outline: str,
           fill: str, label_expression: str) -> QgsVectorLayer:
    existing = find_layer(name, crs)
    if existing is not None:
        return existing
    crs_part = f"crs={crs.authid()}&" if crs.authid() else ""
    uri = "Polygon?" + crs_part + "&".join("field=" + f for f in fields) + "&index=yes"
    layer = QgsVectorLayer(uri, name, "memory")
    if not crs.authid():  # custom CRS: no authority id to put in the URI
        layer.setCrs(crs)
    _style(layer, outline, fill, label_expression)
    QgsProject.instance().addMapLayer(layer, False)
    _group().insertLayer(0, layer)
    return layer


def answers_layer(crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
    """The answers layer in ``crs`` (created, styled and grouped on first use)."""
    # outline only: repeated questions about one region stack up, a fill would turn opaque
    return _layer(ANSWERS_LAYER, crs, ANSWER_FIELDS, ANSWER_COLOR, ANSWER_COLOR + ",0",
                  ANSWER_TEXT)


def detections_layer(crs: QgsCoordinateReferenceSystem) -> QgsVectorLayer:
    """The detections layer in ``crs`` (created, styled and grouped on first use)."""
    return _layer(DETECTIONS_LAYER, crs, DETECTION_FIELDS, DETECTION_COLOR,
                  DETECTION_COLOR + ",40", DETECTION_LABEL)


def _set(feature: QgsFeature, **values: Any) -> None:
    """Set attributes by name: a layer kept in a GeoPackage has an extra ``fid`` column, so
    positions differ from the memory layer's."""
    names = feature.fields().names()
    for name, value in values.items():
        if name in names:
            feature.setAttribute(name, value)


def label_newest(layer: QgsVectorLayer) -> None:
    """Label only the newest answer of each region.  The ids are written into the label
    expression rather than found by an aggregate, which would run over the layer from the
    render thread while the analyst edits or removes it."""
    newest: Dict[str, int] = {}
    for feature in layer.getFeatures():
        key = feature.geometry().asWkt(3) if feature.hasGeometry() else ""
        newest[key] = max(newest.get(key, feature.id()), feature.id())
    labeling = layer.labeling()
    if labeling is None or not newest:
        return
    settings = QgsPalLayerSettings(labeling.settings())
    ids = ", ".join(str(fid) for fid in sorted(newest.values()))
    settings.fieldName = f"if($id IN ({ids}), {ANSWER_TEXT}, NULL)"
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))


def _append(layer: QgsVectorLayer, features: List[QgsFeature]) -> List[int]:
    """Add features through the provider (no edit session for the analyst to close) and
    return their feature ids."""
    if not features:
        return []
    ok, added = layer.dataProvider().addFeatures(features)
    if not ok:
        raise RuntimeError(f"Could not add features to {layer.name()}")
    layer.updateExtents()
    layer.triggerRepaint()
    return [feature.id() for feature in added]


def add_result(result: Dict[str, Any], question: str, task: str,
               fallback_region: Optional[QgsGeometry] = None, raster: str = "") -> Dict[str, Any]:
    """Append one engine result to the answers (and, for boxes, detections) layers.

    ``task`` is the protocol task id; ``fallback_region`` (already in the result's CRS) is used
    if the engine sent no extent; ``raster`` is the file the answer was asked about.  The
    ``answer`` attribute is the readable text, ``raw`` the model's own output.
    Returns ``{"answers": layer, "detections": layer or None, "boxes": n, "answer_id": fid}``.
    """
    crs = crs_from_engine(str(result.get("crs") or ""))
    created = str(result.get("created") or QDateTime.currentDateTime().toString(Qt.ISODate))
    model = model_name(result)
    extent = result.get("extent") or {}
    wkt = extent.get("wkt") if isinstance(extent, dict) else None
    region = QgsGeometry.fromWkt(wkt) if wkt else QgsGeometry(fallback_region or QgsGeometry())

    answers = answers_layer(crs)
    feature = QgsFeature(answers.fields())
    feature.setGeometry(region)
    _set(feature, task=task, question=question, answer=answer_text.readable_answer(result),
         raw=answer_text.raw_output(result), raster=raster, model=model, created=created)
    answer_ids = _append(answers, [feature])
    label_newest(answers)

    boxes = [b for b in (result.get("boxes") or []) if isinstance(b, dict) and b.get("wkt")]
    detections = None
    if boxes:
        detections = detections_layer(crs)
        features = []
        for box in boxes:
            feat = QgsFeature(detections.fields())
            feat.setGeometry(QgsGeometry.fromWkt(str(box["wkt"])))
            score = box.get("score")
            _set(feat, label=str(box.get("label") or ""),
                 score=float(score) if score is not None else None,
                 question=question, raster=raster, model=model, created=created)
            features.append(feat)
        _append(detections, features)
    return {"answers": answers, "detections": detections, "boxes": len(boxes),
            "answer_id": answer_ids[0] if answer_ids else None}
