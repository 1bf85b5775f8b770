"""Export of a result layer to a Shapefile, GeoPackage or GeoJSON file, and keeping the
scratch layers in the project's own GeoPackage.

The memory result layers vanish with the session; exporting hands them to other tools.  The
layer is written in its own CRS (no transform), so the boxes keep the exact raster-CRS
coordinates the engine computed, and the file's CRS (``.prj`` / ``gpkg_spatial_ref_sys``)
says so.  The default file name says which raster and when (``scene_answers_20261201-2337``),
so exports of several rasters never overwrite each other by accident, and the written file is
added to the map so the analyst sees what was written.
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

from qgis.core import QgsProject, QgsVectorFileWriter, QgsVectorLayer

DRIVERS: Dict[str, str] = {".shp": "ESRI Shapefile", ".gpkg": "GPKG", ".geojson": "GeoJSON",
                           ".json": "GeoJSON"}
FILE_FILTER = "GeoPackage (*.gpkg);;ESRI Shapefile (*.shp);;GeoJSON (*.geojson)"


class ExportError(RuntimeError):
    """The file could not be written; the message is meant for the analyst."""


def driver_for(path: str) -> str:
    """The OGR driver for a file name, chosen by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in DRIVERS:
        raise ExportError(f"Unsupported file type '{suffix or path}': use .gpkg, .shp or .geojson.")
    return DRIVERS[suffix]


def default_file_name(raster_name: str, kind: str, when: Optional[datetime] = None,
                      suffix: str = ".gpkg") -> str:
    """``<raster>_<kind>_<YYYYmmdd-HHMM><suffix>``, the raster name made file-system safe."""
    stem = re.sub(r"[^\w.-]+", "_", Path(raster_name or "rs_lvlm").stem).strip("._") or "rs_lvlm"
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M")
    return f"{stem}_{kind}_{stamp}{suffix}"


def default_folder(project: Optional[QgsProject] = None) -> Path:
    """Where exports go by default: the project's folder when it is saved, else the home."""
    project = project or QgsProject.instance()
    home = project.homePath() if project.fileName() else ""
    return Path(home) if home else Path.home()


def table_name(layer: QgsVectorLayer) -> str:
    """The table name inside a GeoPackage: ``rs_lvlm_answers`` for "RS-LVLM answers"."""
    return layer.name().replace(" ", "_").replace("-", "_").lower()


def export_layer(layer: QgsVectorLayer, path: str, overwrite_file: bool = True,
                 table: str = "") -> str:
    """Write ``layer`` to ``path`` and return the written file name (the whole file is
    replaced, or with ``overwrite_file=False`` only table ``table`` inside a GeoPackage)."""
    if layer is None or not layer.isValid():
        raise ExportError("There is no result layer to export yet; ask a question first.")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = driver_for(path)
    options.fileEncoding = "UTF-8"
    options.layerName = table or table_name(layer)
    options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteFile
    if not overwrite_file and Path(path).is_file():
        options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    error, message, written, _layer = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise ExportError(f"Could not write {path}: {message or error}")
    return written or path


def add_to_map(path: str, name: str, layer_name: str = "") -> Optional[QgsVectorLayer]:
    """Open a written file as a layer of the project (``None`` if it does not open)."""
    uri = f"{path}|layername={layer_name}" if layer_name and path.endswith(".gpkg") else path
    layer = QgsVectorLayer(uri, name, "ogr")
    if not layer.isValid():
        return None
    QgsProject.instance().addMapLayer(layer)
    return layer


def project_geopackage(crs_tag: str = "", project: Optional[QgsProject] = None
                       ) -> Optional[Path]:
    """A new ``<project folder>/<project name>_rs_lvlm[_<crs>].gpkg`` (``_2``, ``_3``... when
    taken), or ``None`` for an unsaved project."""
    project = project or QgsProject.instance()
    if not project.fileName():
        return None
    stem = Path(project.homePath()) / (f"{Path(project.fileName()).stem}_rs_lvlm"
                                       + (f"_{crs_tag}" if crs_tag else ""))
    path, n = stem.with_suffix(".gpkg"), 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}_{n}.gpkg")
    return path


def crs_tag(layer: QgsVectorLayer) -> str:
    """``epsg_32633`` for a layer in EPSG:32633 (``custom_crs`` without an authority id)."""
    return re.sub(r"\W+", "_", layer.crs().authid()).lower() or "custom_crs"


def make_permanent(layers: List[QgsVectorLayer], gpkg: Path) -> Dict[str, QgsVectorLayer]:
    """Replace memory result layers by the same layers stored in the new GeoPackage ``gpkg``:
    same names, styles and places in the layer tree, so later answers are appended to the
    file.  Returns ``{old layer id: stored layer}``.

    Every table is written into a fresh file before any of them is opened: writing with GDAL
    into a GeoPackage that QGIS holds open (and renders from other threads) corrupts memory in
    QGIS 3.22; appending through the opened layers' providers is safe.
    """
    if gpkg.exists():
        raise ExportError(f"{gpkg} exists already; results are only stored in a new file.")
    written: Dict[str, str] = {}
    for layer in layers:
        if layer.providerType() != "memory":
            continue
        subset = layer.subsetString()  # every feature goes to the file, not only those shown
        layer.setSubsetString("")
        try:
            written[layer.id()] = export_layer(layer, str(gpkg), overwrite_file=not written,
                                               table=table_name(layer))
        finally:
            layer.setSubsetString(subset)
    stored_layers: Dict[str, QgsVectorLayer] = {}
    for layer in layers:
        layer_id = layer.id()  # read before the swap deletes the memory layer
        if layer_id in written:
            stored_layers[layer_id] = _swap(layer, written[layer_id])
    return stored_layers


def _swap(layer: QgsVectorLayer, path: str) -> QgsVectorLayer:
    """Open table ``layer`` of ``path`` in place of the memory ``layer``, with its style."""
    stored = QgsVectorLayer(f"{path}|layername={table_name(layer)}", layer.name(), "ogr")
    if not stored.isValid():
        raise ExportError(f"Could not open {path} after writing it.")
    stored.setRenderer(layer.renderer().clone())
    if layer.labeling() is not None:
        stored.setLabeling(layer.labeling().clone())
        stored.setLabelsEnabled(layer.labelsEnabled())
    stored.setSubsetString(layer.subsetString())
    project = QgsProject.instance()
    node = project.layerTreeRoot().findLayer(layer.id())
    parent = node.parent() if node is not None else project.layerTreeRoot()
    index = parent.children().index(node) if node is not None else 0
    project.addMapLayer(stored, False)
    parent.insertLayer(index, stored)
    project.removeMapLayer(layer.id())
    return stored
