"""The asked region: where it comes from, checking it, and turning it into ``ask`` params.

The plugin sends the region in the CRS it was drawn in (the canvas CRS, or the polygon layer's
CRS for a selected feature) and lets the engine reproject it onto the raster: the engine owns
raster windows and CRS handling, and doing it twice would invite off-by-a-pixel disagreements.
What the plugin does check, before anything is sent, is what the analyst can fix in the panel:
a raster is chosen and is a local file, the region exists, overlaps the raster and covers more
than a few source pixels, and a question is typed for the ``Ask`` task.  The request itself is
built in :mod:`protocol`.  Each failure is one clear sentence, never a traceback.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsGeometry,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

# Region sources, in the order of the dock's region combo (the first is fixed by the contract).
CANVAS = "canvas"
RECTANGLE = "rectangle"
POLYGON = "polygon"
FEATURE = "feature"

# Below this many source pixels on its shorter side a region is refused: the model would
# describe a handful of pixels with a confident sentence (the task table is in protocol.py).
MIN_REGION_PIXELS = 8

_AUTHID = re.compile(r"^(EPSG|ESRI|IGNF|OGC|IAU_2015):\S+$", re.IGNORECASE)


@dataclass
class Region:
    """A region as drawn: a geometry and the CRS its coordinates are in."""

    geometry: QgsGeometry
    crs: QgsCoordinateReferenceSystem
    kind: str = RECTANGLE

    def is_rectangle(self) -> bool:
        """Rectangles (canvas extent, drawn box) travel as ``bbox``; anything else as WKT."""
        return self.kind in (CANVAS, RECTANGLE)


class RegionError(ValueError):
    """A problem the analyst can fix in the panel; its text is shown as is."""


def crs_to_engine(crs: QgsCoordinateReferenceSystem) -> str:
    """A CRS string the engine (pyproj) understands: the authority id when it is a public one,
    else WKT (custom ``USER:`` CRSs only exist in this QGIS profile)."""
    authid = crs.authid()
    if authid and _AUTHID.match(authid):
        return authid
    variant = getattr(QgsCoordinateReferenceSystem, "WKT_PREFERRED", None)
    return crs.toWkt(variant) if variant is not None else crs.toWkt()


def crs_from_engine(text: str) -> QgsCoordinateReferenceSystem:
    """Parse the ``crs`` of an engine result (``EPSG:xxxx`` or WKT)."""
    text = (text or "").strip()
    if _AUTHID.match(text):
        return QgsCoordinateReferenceSystem(text)
    crs = QgsCoordinateReferenceSystem.fromWkt(text)
    return crs if crs.isValid() else QgsCoordinateReferenceSystem(text)


def raster_path(layer: QgsRasterLayer) -> Optional[str]:
    """The local file behind a GDAL raster layer, or ``None`` for WMS/XYZ/in-memory rasters
    that the engine cannot read."""
    if layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    return path if path and os.path.isfile(path) else None


def canvas_region(canvas: Any) -> Region:
    """The current canvas extent in the canvas CRS."""
    extent: QgsRectangle = canvas.extent()
    return Region(QgsGeometry.fromRect(extent), canvas.mapSettings().destinationCrs(), CANVAS)


def selected_feature_region(layer: Optional[QgsMapLayer]) -> Region:
    """The union of the selected features of a polygon layer, in that layer's CRS."""
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        raise RegionError("Choose a polygon layer with a selected feature.")
    features = list(layer.getSelectedFeatures())
    if not features:
        raise RegionError(f"Select a feature in the layer '{layer.name()}' first.")
    geometry = QgsGeometry.unaryUnion([f.geometry() for f in features if f.hasGeometry()])
    if geometry is None or geometry.isEmpty() or geometry.area() <= 0:
        raise RegionError(f"The selected features of '{layer.name()}' have no area.")
    return Region(geometry, layer.crs(), FEATURE)


def prefer_analyst_layer(combo: Any, own_prefix: str) -> None:
    """Move a polygon-layer combo off the plugin's own result layers (names starting with
    ``own_prefix``) onto the analyst's first layer, if there is one; ours stay choosable."""
    current = combo.currentLayer()
    if current is None or not current.name().startswith(own_prefix):
        return
    for i in range(combo.count()):
        layer = combo.layer(i)
        if layer is not None and not layer.name().startswith(own_prefix):
            combo.setLayer(layer)
            return


def to_crs(region: Region, crs: QgsCoordinateReferenceSystem) -> QgsGeometry:
    """The region's geometry in another CRS (raises :class:`RegionError` if it cannot be)."""
    geometry = QgsGeometry(region.geometry)
    if region.crs.isValid() and crs.isValid() and region.crs != crs:
        transform = QgsCoordinateTransform(region.crs, crs, QgsProject.instance())
        try:
            geometry.transform(transform)
        except QgsCsException as exc:
            raise RegionError("The region cannot be transformed to the raster's CRS.") from exc
    return geometry


def validate(raster: Optional[QgsMapLayer], region: Optional[Region], task: str,
             question: str) -> str:
    """Check an ask before it is sent; return the raster path or raise :class:`RegionError`."""
    if not isinstance(raster, QgsRasterLayer) or not raster.isValid():
        raise RegionError("Choose a raster layer first (add a GeoTIFF to the project).")
    path = raster_path(raster)
    if path is None:
        raise RegionError(f"The layer '{raster.name()}' is not a local raster file; "
                          "the engine can only read rasters from disk.")
    if region is None or region.geometry is None or region.geometry.isEmpty():
        raise RegionError("Draw a region on the map first (or choose the canvas extent).")
    if region.geometry.area() <= 0:
        raise RegionError("The region has no area; draw a larger one.")
    in_raster_crs = to_crs(region, raster.crs())
    if not in_raster_crs.intersects(QgsGeometry.fromRect(raster.extent())):
        raise RegionError(f"The region does not overlap the raster layer '{raster.name()}'.")
    _check_scale(raster, in_raster_crs)
    if task == "vqa" and not question.strip():
        raise RegionError("Type a question for the 'Ask' task.")
    return path


def region_pixels(raster: QgsRasterLayer, geometry: QgsGeometry) -> Tuple[float, float]:
    """Width and height in source pixels of the part of ``geometry`` (raster CRS) that lies
    on the raster."""
    box = geometry.boundingBox().intersect(raster.extent())
    x_res = raster.rasterUnitsPerPixelX() or 1.0
    y_res = raster.rasterUnitsPerPixelY() or 1.0
    return box.width() / x_res, box.height() / y_res


def _check_scale(raster: QgsRasterLayer, geometry: QgsGeometry) -> None:
    """Refuse a region far below the model's scale before asking (the engine also warns)."""
    width, height = region_pixels(raster, geometry)
    if min(width, height) < MIN_REGION_PIXELS:
        raise RegionError(
            f"The region covers only {width:.0f} x {height:.0f} source pixels of "
            f"'{raster.name()}'; draw one at least {MIN_REGION_PIXELS} pixels across "
            "(the model needs more than a few pixels to say anything).")
