"""Write answers and detections to GeoPackage, Shapefile or GeoJSON (fiona), keeping the CRS.

Why: the analyst keeps what the model said as ordinary GIS data, so it can be styled, edited,
shared and opened by any tool.  One fixed attribute schema serves all three formats:

============  ======  =======================================================
field         type    meaning
============  ======  =======================================================
``uid``       str     stable feature id (uuid4 hex unless the record has one)
``task``      str     caption / vqa / ground / classify
``question``  str     the analyst's question
``answer``    str     the model's full answer text
``label``     str     object label of a grounded box (empty for answers)
``score``     float   confidence (null when unknown)
``model``     str     model name / checkpoint
``created``   str     ISO 8601 time, UTC
============  ======  =======================================================

Field names are chosen to be at most 10 characters, so the same names are used in every format
(Shapefile's dBASE limit needs no renaming: ``question`` -> ``question``, ``created`` ->
``created``...).  Records are dicts with those keys plus ``wkt`` (the geometry in ``crs``; empty
or missing for a feature without geometry); missing keys are written empty, other keys ignored.

Format notes
------------
* **Format by extension:** ``.gpkg`` GeoPackage (layer ``layer``), ``.shp`` ESRI Shapefile,
  ``.geojson``/``.json`` GeoJSON.  Shapefile and GeoJSON hold one layer: ``layer`` is ignored.
* **Append:** with ``append=True`` an existing layer (or file) is added to, its earlier features
  kept; a GeoPackage's other layers are never touched.  Appended geometries are reprojected into
  the existing layer's CRS if ``crs`` differs, and polygons are promoted to multipolygons (or
  single-part multipolygons demoted) to match the layer's geometry type.  ``append=False``
  replaces the layer (GeoPackage) or the file (the others).
* **Shapefile long text (sidecar):** dBASE strings hold at most 254 bytes.  Each string field is
  cut at 254 UTF-8 bytes (on a character boundary), ending in "…" when cut, and the *full* text
  of every cut field is written to a sidecar ``<name>.answers.jsonl`` next to the ``.shp``: one
  JSON object per cut feature, ``{"uid": ..., "<field>": "<full text>", ...}``, keyed by the
  ``uid`` field.  :func:`read_features` joins it back.  We chose a sidecar over splitting into
  ``answer``, ``answer2``... fields because a split needs a fixed number of fields when the file
  is created (later, longer answers could still not fit) and makes the attribute table unreadable;
  the truncated field still shows the start of the answer in any GIS.  Keep the sidecar with the
  ``.shp``/``.dbf``/``.prj``/``.cpg`` files.  Text is written as UTF-8 (``.cpg``).
* **Concurrent writers:** every write (the existing-layer check, the append and the Shapefile
  sidecar together) holds an exclusive lock on a hidden ``.<name>.lock`` file beside the output
  (:mod:`filelock`: ``flock`` on Unix, ``msvcrt`` locking on Windows), so two engines or two
  threads appending to one file never lose, duplicate or fail a feature: without it, both could
  see "no layer yet" and create it twice, or append while the other rewrites.  A writer waits
  up to :data:`LOCK_TIMEOUT_S` for the lock, then fails with ``export_failed``.
* **GeoJSON CRS:** RFC 7946 says GeoJSON coordinates are WGS 84 longitude/latitude
  (EPSG:4326).  We nevertheless write in the CRS asked for, as GDAL does by default, with a
  ``crs`` member naming it when it is not EPSG:4326, so no reprojection error is introduced; pass
  ``crs="EPSG:4326"`` geometries for strict RFC 7946 consumers.
"""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import fiona
import shapely
from filelock import FileLock, Timeout
from fiona._err import CPLE_BaseError  # GDAL errors fiona raises as they are (not FionaError)
from fiona.errors import FionaError
from shapely.geometry import MultiLineString, MultiPoint, MultiPolygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from engine.errors import EXPORT_FAILED, EngineError
from engine.geo.georef import parse_crs, transform_geometry

__all__ = ["FIELDS", "write_features", "read_features", "sidecar_path", "lock_path"]

CORE_FIELDS: dict[str, str] = {
    "uid": "str", "task": "str", "question": "str", "answer": "str", "label": "str",
    "score": "float", "model": "str", "created": "str",
}
FIELDS: dict[str, str] = {**CORE_FIELDS, "raw": "str", "raster": "str"}
"""The attribute schema (name -> fiona type), identical in every format.  ``answer`` is the
readable text, ``raw`` the model's own output (box syntax included), ``raster`` the source.
Files written before ``raw``/``raster`` existed are appended to with the core fields only."""

DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile", ".geojson": "GeoJSON", ".json": "GeoJSON"}
SHP_MAX_BYTES = 254
LOCK_TIMEOUT_S = 120.0
"""How long a writer waits for another one to finish with the same file."""
_ELLIPSIS = "…"
_MULTI = {"Polygon": MultiPolygon, "Point": MultiPoint, "LineString": MultiLineString}


def sidecar_path(shp: str | Path) -> Path:
    """Where a Shapefile's full long texts live: ``<name>.answers.jsonl`` beside it."""
    shp = Path(shp)
    return shp.with_name(shp.stem + ".answers.jsonl")


def lock_path(path: str | Path) -> Path:
    """The lock file every writer of ``path`` holds: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def write_features(path: str | Path, records: list[dict], crs: str | None, layer: str = "answers",
                   append: bool = True) -> Path:
    """Write ``records`` (see the module docstring) to ``path`` in ``crs``; returns the path.

    Holds the file's lock for the whole check-and-write (see "Concurrent writers" above).
    ``crs`` None (a raster without CRS) writes pixel coordinates with no CRS (not to GeoJSON).
    Raises ``EngineError(EXPORT_FAILED)`` for an unknown extension, unreadable WKT, a write
    that GDAL refuses or a lock not obtained in time, ``EngineError(UNKNOWN_CRS)`` for a bad ``crs``.
    """
    path = Path(path).expanduser()
    driver = DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise EngineError(EXPORT_FAILED, f"cannot export to {path.name}: use .gpkg, .shp or .geojson")
    src_crs = parse_crs(crs, "crs") if crs else None  # None: a raster without CRS, pixel coordinates
    if src_crs is None and driver == "GeoJSON":
        raise EngineError(EXPORT_FAILED, f"cannot export to {path.name}: GeoJSON is always longitude/latitude, "
                                         "and this raster has no CRS; use .gpkg or .shp")
    geoms = [_geometry(r) for r in records]
    props = [_properties(r) for r in records]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path(path)), timeout=LOCK_TIMEOUT_S):
            _write_locked(path, driver, layer, append, src_crs, geoms, props)
    except Timeout:
        raise EngineError(EXPORT_FAILED, f"could not write {path}: another writer held it for more than "
                                         f"{LOCK_TIMEOUT_S:.0f} s") from None
    except EngineError:
        raise
    except (FionaError, CPLE_BaseError, OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(EXPORT_FAILED, f"could not write {path}: {exc}") from None
    return path


def _write_locked(path: Path, driver: str, layer: str, append: bool, src_crs: Any,
                  geoms: list[BaseGeometry | None], props: list[dict]) -> None:
    """The check-and-write itself; the caller holds the file's lock."""
    shp = driver == "ESRI Shapefile"
    existing = _existing_layer(path, driver, layer) if append else None
    if existing is None:
        if not append or driver != "GPKG":
            _remove(path, driver)
        gtype = _geometry_type(geoms)
        crs_wkt = src_crs.to_wkt() if src_crs is not None else ""
        mode, schema = "w", {"geometry": gtype,
                             "properties": {k: ("str:254" if shp and v == "str" else v)
                                            for k, v in FIELDS.items()}}
    else:
        mode, schema, crs_wkt = "a", existing[0], existing[1]
        missing = [k for k in CORE_FIELDS if k not in schema["properties"]]
        if missing:
            raise EngineError(EXPORT_FAILED, f"cannot append to {path.name}: its layer lacks "
                                             f"the fields {missing}; write to a new layer or file")
        layer_crs = parse_crs(crs_wkt, "layer CRS") if crs_wkt else None
        if (layer_crs is None) != (src_crs is None):
            raise EngineError(EXPORT_FAILED, f"cannot append to {path.name}: one of the layer and the new "
                                             "features has no CRS (pixel coordinates); write to a new file")
        if layer_crs != src_crs:
            geoms = [transform_geometry(g, src_crs, layer_crs) if g is not None else None
                     for g in geoms]
        gtype = schema["geometry"]
    feats, long_texts = [], []
    for g, p in zip(geoms, props):
        if shp:
            p, full = _fit_dbase(p)
            if full:
                long_texts.append({"uid": p["uid"], **full})
        p = {k: p.get(k) for k in schema["properties"]}
        feats.append({"geometry": _match_type(g, gtype, path), "properties": p})
    kwargs: dict[str, Any] = {"driver": driver}
    if driver == "GPKG":
        kwargs["layer"] = layer
    if mode == "w":
        kwargs.update(schema=schema, crs_wkt=crs_wkt)
        if shp:
            kwargs["encoding"] = "utf-8"
    with fiona.open(path, mode, **kwargs) as dst:
        dst.writerecords(feats)
    if long_texts:
        with open(sidecar_path(path), "a", encoding="utf-8") as f:
            for line in long_texts:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


def read_features(path: str | Path, layer: str | None = "answers") -> list[dict]:
    """Read back what :func:`write_features` wrote: dicts with the fields, ``wkt`` and ``crs``.

    For a Shapefile the full texts of the sidecar replace the truncated ones.
    """
    path = Path(path)
    driver = DRIVERS.get(path.suffix.lower())
    kwargs = {"layer": layer} if driver == "GPKG" and layer else {}
    out = []
    with fiona.open(path, **kwargs) as src:
        crs = src.crs.to_string() if src.crs else ""
        for feat in src:
            rec = dict(feat["properties"])
            rec["wkt"] = shape(feat["geometry"]).wkt if feat["geometry"] else ""
            rec["crs"] = crs
            out.append(rec)
    side = sidecar_path(path)
    if driver == "ESRI Shapefile" and side.exists():
        full: dict[str, dict] = {}
        for line in side.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and "uid" in item:
                full.setdefault(str(item["uid"]), {}).update(item)
        for rec in out:
            rec.update(full.get(str(rec.get("uid")), {}))
    return out


# --------------------------------------------------------------------------- helpers


def _geometry(record: dict) -> BaseGeometry | None:
    text = record.get("wkt")
    if not text:
        return None
    try:
        return shapely.from_wkt(text)
    except (shapely.errors.GEOSException, TypeError) as exc:
        raise EngineError(EXPORT_FAILED, f"record geometry is not valid WKT: {exc}") from None


def _properties(record: dict) -> dict:
    p: dict[str, Any] = {}
    for k, t in FIELDS.items():
        v = record.get(k)
        if t == "float":
            try:
                p[k] = None if v is None or v == "" else float(v)
            except (TypeError, ValueError):
                p[k] = None
        else:
            p[k] = "" if v is None else str(v)
    if not p["uid"]:
        p["uid"] = uuid.uuid4().hex
    if not p["created"]:
        p["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return p


def _fit_dbase(props: dict) -> tuple[dict, dict]:
    """Cut strings to dBASE's 254 bytes; return the cut properties and the full texts cut."""
    cut, full = dict(props), {}
    for k, v in props.items():
        if isinstance(v, str) and len(v.encode("utf-8")) > SHP_MAX_BYTES:
            room = SHP_MAX_BYTES - len(_ELLIPSIS.encode("utf-8"))
            cut[k] = v.encode("utf-8")[:room].decode("utf-8", "ignore") + _ELLIPSIS
            full[k] = v
    return cut, full


def _geometry_type(geoms: Iterable[BaseGeometry | None]) -> str:
    """One fiona geometry type for a new layer: the common type, Multi* when parts mix."""
    types = {g.geom_type for g in geoms if g is not None}
    if not types:
        return "Polygon"
    if len(types) == 1:
        return types.pop()
    bases = {t.replace("Multi", "") for t in types}
    if len(bases) == 1 and (base := bases.pop()) in _MULTI:
        return "Multi" + base
    return "Unknown"


def _match_type(geom: BaseGeometry | None, gtype: str, path: Path) -> dict | None:
    """GeoJSON-like mapping of ``geom`` promoted/demoted to the layer's geometry type."""
    if geom is None:
        return None
    gt = gtype.replace("3D ", "")
    if gt in ("Unknown", "Any", "Geometry", "GeometryCollection") or geom.geom_type == gt:
        return mapping(geom)
    if gt.startswith("Multi") and geom.geom_type == gt[5:]:
        return mapping(_MULTI[geom.geom_type]([geom]))
    if geom.geom_type == "Multi" + gt and len(geom.geoms) == 1:
        return mapping(geom.geoms[0])
    if path.suffix.lower() == ".shp" and geom.geom_type.replace("Multi", "") == gt.replace("Multi", ""):
        return mapping(geom)
    raise EngineError(EXPORT_FAILED, f"{path.name} holds {gtype} features; cannot add a "
                                     f"{geom.geom_type}")


def _existing_layer(path: Path, driver: str, layer: str) -> tuple[dict, str] | None:
    """(schema, CRS WKT) of the layer to append to, or None when it does not exist yet."""
    if not path.exists():
        return None
    if driver == "GPKG" and layer not in fiona.listlayers(path):
        return None
    kwargs = {"layer": layer} if driver == "GPKG" else {}
    with fiona.open(path, **kwargs) as src:
        return dict(src.schema), src.crs_wkt


def _remove(path: Path, driver: str) -> None:
    """Delete a file being replaced (with a Shapefile's companions and sidecar)."""
    if driver == "ESRI Shapefile":
        for ext in (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx"):
            p = path.with_suffix(ext)
            if p.exists():
                os.remove(p)
        if sidecar_path(path).exists():
            os.remove(sidecar_path(path))
    elif driver != "GPKG" and path.exists():
        os.remove(path)
