"""The RS-LVLM Processing algorithms: ``rs_lvlm:ask``, ``rs_lvlm:detect``, ``rs_lvlm:classify_tiles``.

Why Processing: an analyst's real job is a whole orthophoto or a batch of them, chained with
other tools; as algorithms the model works in the toolbox, batch mode, the Graphical Modeler and
``qgis_process`` with no extra code.  Each run starts its own engine (:mod:`.engine_call`), so the
algorithms are independent of the dock and safe in any thread.  ``detect`` and ``classify_tiles``
run the engine's resumable ``scan`` into a GeoPackage in the Processing temp folder and copy its
layer into the algorithm's output, so any output format (or a memory layer) works.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingUtils,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QIcon

from .. import paths
from .engine_call import EngineSession, engine_defaults

__all__ = ["AskAlgorithm", "DetectAlgorithm", "ClassifyTilesAlgorithm"]

ASK_TASKS = ("caption", "vqa", "ground", "classify")
TILE_TASKS = ("classify", "caption")


def _raster_path(layer: QgsRasterLayer) -> str:
    """The file GDAL opens for a raster layer (its source without QGIS's ``|option`` suffixes)."""
    if layer.providerType() != "gdal":
        raise QgsProcessingException(f"{layer.name()} is not a GDAL raster (provider {layer.providerType()}); "
                                     "save it as a GeoTIFF first")
    return layer.source().split("|")[0]


def _extent_bbox(alg: QgsProcessingAlgorithm, parameters: Dict[str, Any], context: QgsProcessingContext,
                 layer: QgsRasterLayer) -> Optional[List[float]]:
    """The optional EXTENT in the raster's CRS as [xmin, ymin, xmax, ymax], or None (whole raster)."""
    if not parameters.get("EXTENT"):
        return None
    rect = alg.parameterAsExtent(parameters, "EXTENT", context, layer.crs())
    if rect is None or rect.isNull() or rect.isEmpty():
        return None
    return [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]


class _Base(QgsProcessingAlgorithm):
    """Shared naming, icon and help of the provider's algorithms."""

    _name = ""
    _display = ""
    _help = ""

    def name(self) -> str:
        return self._name

    def displayName(self) -> str:  # noqa: N802 (QGIS API)
        return self._display

    def group(self) -> str:
        return "Remote-sensing model"

    def groupId(self) -> str:  # noqa: N802
        return "model"

    def shortHelpString(self) -> str:  # noqa: N802
        return self._help

    def icon(self) -> QIcon:
        return QIcon(paths.icon_path())

    def createInstance(self) -> "_Base":  # noqa: N802
        return type(self)()

    @staticmethod
    def _progress(feedback: QgsProcessingFeedback):
        def report(done: int, total: int, message: str) -> None:
            if total > 0:
                feedback.setProgress(100.0 * done / total)
            if message:
                feedback.setProgressText(message)
        return report


class _ScanAlgorithm(_Base):
    """detect and classify_tiles: one engine ``scan``, its layer copied to OUTPUT."""

    _task = "ground"
    _layer = "detections"
    _default_overlap_help = ""

    def _add_parameters(self, choice: QgsProcessingParameterDefinition, output: str,
                        extra: Optional[QgsProcessingParameterDefinition] = None) -> None:
        """INPUT, the task's own choice, EXTENT, TILE, OVERLAP, BATCH, ``extra``, OUTPUT."""
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster"))
        self.addParameter(choice)
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent (empty: the whole raster)", optional=True))
        tile = QgsProcessingParameterNumber("TILE", "Tile size in raster pixels (0: the model's training ground size)",
                                            QgsProcessingParameterNumber.Integer, 0, False, 0, 65536)
        overlap = QgsProcessingParameterNumber("OVERLAP", f"Overlap in raster pixels (-1: {self._default_overlap_help})",
                                               QgsProcessingParameterNumber.Integer, -1, False, -1, 32768)
        batch = QgsProcessingParameterNumber("BATCH", "Tiles per forward pass", QgsProcessingParameterNumber.Integer,
                                             8, False, 1, 256)
        batch.setFlags(batch.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        for p in (tile, overlap, batch) + ((extra,) if extra is not None else ()):
            self.addParameter(p)
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", output, QgsProcessing.TypeVectorPolygon))

    def _scan_params(self, parameters: Dict[str, Any], context: QgsProcessingContext) -> Dict[str, Any]:
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("INPUT is not a raster layer")
        out = QgsProcessingUtils.generateTempFilename(f"rs_lvlm_{self._task}.gpkg")
        params: Dict[str, Any] = {"raster": _raster_path(layer), "task": self._task, "out": out,
                                  "batch": self.parameterAsInt(parameters, "BATCH", context), **engine_defaults()}
        bbox = _extent_bbox(self, parameters, context, layer)
        if bbox is not None:
            params["bbox"] = bbox
        tile = self.parameterAsInt(parameters, "TILE", context)
        overlap = self.parameterAsInt(parameters, "OVERLAP", context)
        if tile > 0:
            params["tile"] = tile
        if overlap >= 0:
            params["overlap"] = overlap
        return params

    def _run_scan(self, params: Dict[str, Any], parameters: Dict[str, Any], context: QgsProcessingContext,
                  feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        with EngineSession(feedback) as engine:
            summary = engine.call("scan", params, self._progress(feedback))
        for warning in summary.get("warnings") or []:
            feedback.pushWarning(str(warning))
        feedback.pushInfo(f"{summary['tiles']['done']} tiles ({summary['tiles']['tile_px']} px, overlap "
                          f"{summary['tiles']['overlap_px']} px), {summary.get('features', 0)} features, "
                          f"{summary['timing'].get('total_s')} s")
        dest = self._copy_layer(params["out"], summary["run_id"], parameters, context)
        return {"OUTPUT": dest, "GPKG": params["out"], "RUN_ID": summary["run_id"]}

    def _copy_layer(self, gpkg: str, run_id: str, parameters: Dict[str, Any], context: QgsProcessingContext) -> str:
        source = QgsVectorLayer(f"{gpkg}|layername={self._layer}", self._layer, "ogr")
        if not source.isValid():
            raise QgsProcessingException(f"the engine's output {gpkg} has no {self._layer} layer")
        fields = QgsFields()
        for f in source.fields():
            if f.name() != "fid":
                fields.append(f)
        sink, dest = self.parameterAsSink(parameters, "OUTPUT", context, fields, QgsWkbTypes.Polygon, source.crs())
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, "OUTPUT"))
        request = QgsFeatureRequest().setFilterExpression(f"\"run_id\" = '{run_id}'")
        for feat in source.getFeatures(request):
            out = QgsFeature(fields)
            out.setGeometry(feat.geometry())
            out.setAttributes([feat[f.name()] for f in fields])
            sink.addFeature(out, QgsFeatureSink.FastInsert)
        return dest


class DetectAlgorithm(_ScanAlgorithm):
    _name = "detect"
    _display = "Detect objects (whole raster, tiled)"
    _task = "ground"
    _layer = "detections"
    _default_overlap_help = "a quarter of the tile"
    _help = ("Finds the objects the question names over the whole raster (or the EXTENT): the raster is "
             "read tile by tile at the model's scale, tiles go through the model in batches, and objects "
             "cut by tile seams are merged so each is reported once. Output: one polygon per object "
             "(label, score, question, model, tile id, run id), in the raster's CRS.")

    def initAlgorithm(self, config: Optional[Dict[str, Any]] = None) -> None:  # noqa: N802
        self._add_parameters(
            QgsProcessingParameterString("QUESTION", "What to find (e.g. storage tanks; empty: all objects)",
                                         defaultValue="", optional=True),
            "Detections", QgsProcessingParameterNumber("MIN_SCORE", "Minimum score",
                                                       QgsProcessingParameterNumber.Double, 0.0, False, 0.0, 1.0))

    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        params = self._scan_params(parameters, context)
        question = self.parameterAsString(parameters, "QUESTION", context).strip()
        if question:
            params["question"] = question
        params["min_score"] = self.parameterAsDouble(parameters, "MIN_SCORE", context)
        return self._run_scan(params, parameters, context, feedback)


class ClassifyTilesAlgorithm(_ScanAlgorithm):
    _name = "classify_tiles"
    _display = "Classify tiles (land-use map)"
    _task = "classify"
    _layer = "tiles"
    _default_overlap_help = "none"
    _help = ("Cuts the raster (or the EXTENT) into tiles at the model's scale and writes one polygon per tile "
             "with its scene class and score (TASK classify), or its caption (TASK caption): a map ready to "
             "style by category. Tiles do not overlap in the output, whatever the overlap read.")

    def initAlgorithm(self, config: Optional[Dict[str, Any]] = None) -> None:  # noqa: N802
        self._add_parameters(QgsProcessingParameterEnum("TASK", "Per tile", options=list(TILE_TASKS), defaultValue=0),
                             "Tiles")

    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        self._task = TILE_TASKS[self.parameterAsEnum(parameters, "TASK", context)]
        return self._run_scan(self._scan_params(parameters, context), parameters, context, feedback)


class AskAlgorithm(_Base):
    _name = "ask"
    _display = "Ask about regions"
    _help = ("Asks the model one question about each polygon of REGIONS (or the EXTENT, or the whole raster) "
             "and writes the answers (one polygon per region) and the grounded objects (one polygon per box), "
             "in the raster's CRS.")

    def initAlgorithm(self, config: Optional[Dict[str, Any]] = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster"))
        self.addParameter(QgsProcessingParameterFeatureSource("REGIONS", "Regions (polygons; empty: the extent)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent (when no regions; empty: the whole raster)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterEnum("TASK", "Task", options=list(ASK_TASKS), defaultValue=0))
        self.addParameter(QgsProcessingParameterString("QUESTION", "Question", defaultValue="", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink("ANSWERS", "Answers", QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterFeatureSink("DETECTIONS", "Detections", QgsProcessing.TypeVectorPolygon,
                                                            optional=True))

    @staticmethod
    def _fields(names: List[tuple]) -> QgsFields:
        fields = QgsFields()
        for name, kind in names:
            fields.append(QgsField(name, kind))
        return fields

    def _regions(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                 layer: QgsRasterLayer) -> List[tuple]:
        """(region id, params) per region: a polygon in the raster CRS, the extent, or the whole raster."""
        source = self.parameterAsSource(parameters, "REGIONS", context)
        if source is not None:
            to_raster = QgsCoordinateTransform(source.sourceCrs(), layer.crs(), context.transformContext())
            regions = []
            for feat in source.getFeatures():
                geom = QgsGeometry(feat.geometry())
                if geom.isEmpty():
                    continue
                geom.transform(to_raster)
                regions.append((int(feat.id()), {"region_wkt": geom.asWkt()}))
            return regions
        bbox = _extent_bbox(self, parameters, context, layer)
        if bbox is None:
            e = layer.extent()
            bbox = [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()]
        return [(0, {"bbox": bbox})]

    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("INPUT is not a raster layer")
        task = ASK_TASKS[self.parameterAsEnum(parameters, "TASK", context)]
        question = self.parameterAsString(parameters, "QUESTION", context).strip()
        common = [("region_id", QVariant.Int), ("task", QVariant.String), ("question", QVariant.String),
                  ("model", QVariant.String)]
        answer_fields = self._fields(common + [("answer", QVariant.String)])
        box_fields = self._fields(common + [("label", QVariant.String), ("score", QVariant.Double)])
        answers, answers_dest = self.parameterAsSink(parameters, "ANSWERS", context, answer_fields,
                                                     QgsWkbTypes.MultiPolygon, layer.crs())
        boxes, boxes_dest = self.parameterAsSink(parameters, "DETECTIONS", context, box_fields,
                                                 QgsWkbTypes.Polygon, layer.crs())
        if answers is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, "ANSWERS"))
        regions = self._regions(parameters, context, layer)
        base = {"raster": _raster_path(layer), "task": task, **engine_defaults()}
        if question:
            base["question"] = question
        with EngineSession(feedback) as engine:
            for i, (region_id, region) in enumerate(regions):
                if feedback.isCanceled():
                    break
                result = engine.call("ask", {**base, **region})
                attrs = [region_id, task, result.get("question") or question, result.get("model") or ""]
                self._add(answers, answer_fields, result["extent"]["wkt"], attrs + [result.get("text") or ""])
                if boxes is not None:
                    for box in result.get("boxes") or []:
                        self._add(boxes, box_fields, box["wkt"], attrs + [box.get("label") or "", box.get("score")])
                feedback.setProgress(100.0 * (i + 1) / len(regions))
        out = {"ANSWERS": answers_dest}
        if boxes is not None:
            out["DETECTIONS"] = boxes_dest
        return out

    @staticmethod
    def _add(sink: QgsFeatureSink, fields: QgsFields, wkt: str, attrs: List[Any]) -> None:
        feat = QgsFeature(fields)
        geom = QgsGeometry.fromWkt(wkt)
        if fields.indexOf("answer") >= 0:  # the answers sink holds multipolygons (clipped regions)
            geom.convertToMultiType()
        feat.setGeometry(geom)
        feat.setAttributes(attrs)
        sink.addFeature(feat, QgsFeatureSink.FastInsert)
