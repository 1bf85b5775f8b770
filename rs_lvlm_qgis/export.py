"""Export of a result layer to a Shapefile, GeoPackage or GeoJSON file.

The memory result layers vanish with the session; exporting hands them to other tools.  The
layer is written in its own CRS (no transform), so the boxes keep the exact raster-CRS
coordinates the engine computed, and the file's CRS (``.prj`` / ``gpkg_spatial_ref_sys``)
says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

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


def export_layer(layer: QgsVectorLayer, path: str) -> str:
    """Write ``layer`` to ``path`` (overwriting it) and return the written file name."""
    if layer is None or not layer.isValid():
        raise ExportError("There is no result layer to export yet; ask a question first.")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = driver_for(path)
    options.fileEncoding = "UTF-8"
    options.layerName = layer.name().replace(" ", "_").replace("-", "_").lower()
    options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteFile
    error, message, written, _layer = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise ExportError(f"Could not write {path}: {message or error}")
    return written or path
