"""The scan's GeoPackage: layers that fill batch by batch and the record that makes a scan resumable.

Why SQLite directly: a batch's results and the list of tiles it finished must land together or
not at all, so that a scan killed at any instant (``kill -9`` included) and started again redoes
exactly the batches that were not committed.  One SQLite transaction per batch gives that; OGR
(fiona) cannot put two layers and a bookkeeping table in one transaction.  fiona still creates the
layers (schema, CRS, spatial index, so the file is a GeoPackage every GIS reads); rows are then
written here as GeoPackage geometry blobs, with the four ``ST_*`` functions that GDAL's R-tree
triggers call registered in Python.

Layers (features, in the raster CRS): ``detections`` (ground) and ``tiles`` (classify, caption);
every feature carries its ``run_id``.  Bookkeeping tables, not listed as layers:
``rs_lvlm_scan_runs`` (one row per run: its parameters), ``rs_lvlm_scan_tiles`` (the tiles each run
has finished) and ``rs_lvlm_scan_boxes`` (the boxes before the seam merge, so a resumed run rebuilds
its merge state).  A scan with other arguments into the same file appends under its own run id.
"""
from __future__ import annotations

import json
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import fiona
import shapely
from filelock import FileLock, Timeout
from fiona.errors import FionaError
from rasterio.crs import CRS
from shapely.geometry import Polygon

from engine.errors import EXPORT_FAILED, EngineError
from engine.geo.export import lock_path

from .merge import Detection, RawBox

__all__ = ["ScanWriter", "DETECTION_FIELDS", "TILE_FIELDS", "read_layer"]

DETECTION_FIELDS = {"label": "str", "score": "float", "question": "str", "model": "str",
                    "tile_id": "int", "run_id": "str", "parts": "int", "det_key": "str"}
TILE_FIELDS = {"tile_id": "int", "row": "int", "col": "int", "task": "str", "label": "str",
               "score": "float", "text": "str", "question": "str", "model": "str", "run_id": "str"}
LAYER_FIELDS = {"detections": DETECTION_FIELDS, "tiles": TILE_FIELDS}

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS rs_lvlm_scan_runs (run_id TEXT PRIMARY KEY, params TEXT NOT NULL,
    total_tiles INTEGER NOT NULL, started TEXT NOT NULL, finished TEXT);
CREATE TABLE IF NOT EXISTS rs_lvlm_scan_tiles (run_id TEXT NOT NULL, tile_id INTEGER NOT NULL,
    status TEXT NOT NULL, PRIMARY KEY (run_id, tile_id));
CREATE TABLE IF NOT EXISTS rs_lvlm_scan_boxes (run_id TEXT NOT NULL, tile_id INTEGER NOT NULL,
    k INTEGER NOT NULL, label TEXT, score REAL, angle REAL, cut INTEGER, c0 REAL, r0 REAL, c1 REAL,
    r1 REAL, wkb BLOB NOT NULL, PRIMARY KEY (run_id, tile_id, k));
"""


# ------------------------------------------------------------------------ GeoPackage geometry blobs

def gpkg_blob(geom: Polygon, srs_id: int) -> bytes:
    """GeoPackage binary: 'GP', version 0, flags (little endian, xy envelope), srs id, envelope, WKB."""
    xmin, ymin, xmax, ymax = geom.bounds
    return (b"GP\x00\x03" + struct.pack("<i4d", srs_id, xmin, xmax, ymin, ymax)
            + shapely.to_wkb(geom, byte_order=1))


def _envelope(blob: bytes | None) -> tuple[float, float, float, float] | None:
    """(minx, maxx, miny, maxy) from a blob's header, or from its WKB when it has no envelope."""
    if blob is None or len(blob) < 8 or blob[:2] != b"GP":
        return None
    flags = blob[3]
    if flags & 0x10:  # empty geometry
        return None
    env_type = (flags >> 1) & 0x07
    order = "<" if flags & 0x01 else ">"
    if env_type >= 1:
        return struct.unpack(order + "4d", blob[8:40])
    size = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}.get(env_type, 0)
    xmin, ymin, xmax, ymax = shapely.from_wkb(blob[8 + size:]).bounds
    return xmin, xmax, ymin, ymax


def _register_st_functions(conn: sqlite3.Connection) -> None:
    """The spatial functions GDAL's R-tree triggers call (GDAL registers them in its own SQLite)."""
    def part(i: int):
        def fn(blob: bytes | None) -> float | None:
            env = _envelope(blob)
            return None if env is None else env[i]
        return fn

    conn.create_function("ST_IsEmpty", 1, lambda b: 1 if _envelope(b) is None else 0, deterministic=True)
    for i, name in enumerate(("ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY")):
        conn.create_function(name, 1, part(i), deterministic=True)


# ------------------------------------------------------------------------ writer

class ScanWriter:
    """Opens (creating when needed) the scan's GeoPackage for one run; one transaction per batch."""

    def __init__(self, path: str | Path, run_id: str, crs: CRS | None, layer: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.layer = layer
        if self.path.suffix.lower() != ".gpkg":
            raise EngineError(EXPORT_FAILED, f"a scan writes a GeoPackage: out must end in .gpkg, got {self.path.name}")
        # One writer per file for the whole scan (the lock the exports take too): two scans merging
        # into one layer at once would each miss the other's boxes.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(lock_path(self.path)), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise EngineError(EXPORT_FAILED, f"another scan or export is writing {self.path}; wait for it to "
                                             "finish or choose another out") from None
        try:
            self._open(crs)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, crs: CRS | None) -> None:
        self._ensure_layer(crs)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise EngineError(EXPORT_FAILED, f"cannot open {self.path}: {exc}") from None
        _register_st_functions(self.conn)
        self.conn.executescript(_BOOKKEEPING)
        row = self.conn.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = ?",
                                (self.layer,)).fetchone()
        self.srs_id = int(row[0]) if row else 0

    def _ensure_layer(self, crs: CRS | None) -> None:
        """Create the layer with fiona unless the file already has it."""
        try:
            existing = fiona.listlayers(str(self.path)) if self.path.exists() else []
        except FionaError as exc:
            raise EngineError(EXPORT_FAILED, f"{self.path} exists and is not a GeoPackage: {exc}") from None
        if self.layer in existing:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        schema = {"geometry": "Polygon", "properties": dict(LAYER_FIELDS[self.layer])}
        try:
            with fiona.open(str(self.path), "w", driver="GPKG", layer=self.layer, schema=schema,
                            crs=crs.to_wkt() if crs is not None else None):
                pass
        except (FionaError, OSError, ValueError) as exc:
            raise EngineError(EXPORT_FAILED, f"cannot create layer {self.layer} in {self.path}: {exc}") from None

    def close(self) -> None:
        self.conn.close()
        self._lock.release()

    def __enter__(self) -> "ScanWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- run bookkeeping -----------------------------------------------------------------------
    def start_run(self, params: dict, total_tiles: int) -> bool:
        """Record the run; True when it already existed (a resume)."""
        with self._transaction():
            row = self.conn.execute("SELECT 1 FROM rs_lvlm_scan_runs WHERE run_id = ?", (self.run_id,)).fetchone()
            if row is None:
                self.conn.execute("INSERT INTO rs_lvlm_scan_runs VALUES (?, ?, ?, ?, NULL)",
                                  (self.run_id, json.dumps(params, sort_keys=True), total_tiles, _now()))
        return row is not None

    def finish_run(self) -> None:
        with self._transaction():
            self.conn.execute("UPDATE rs_lvlm_scan_runs SET finished = ? WHERE run_id = ?", (_now(), self.run_id))

    def done_tiles(self) -> dict[int, str]:
        """Tile id -> status ("ok" or "nodata") of the tiles this run has committed."""
        return dict(self.conn.execute("SELECT tile_id, status FROM rs_lvlm_scan_tiles WHERE run_id = ?",
                                      (self.run_id,)))

    def raw_boxes(self) -> list[RawBox]:
        rows = self.conn.execute("SELECT tile_id, k, label, score, angle, cut, c0, r0, c1, r1, wkb "
                                 "FROM rs_lvlm_scan_boxes WHERE run_id = ? ORDER BY tile_id, k", (self.run_id,))
        return [RawBox((t, k), label, score, shapely.from_wkb(wkb), (c0, r0, c1, r1), angle, bool(cut))
                for t, k, label, score, angle, cut, c0, r0, c1, r1, wkb in rows]

    def count(self) -> int:
        """Features of this run in the layer."""
        return int(self.conn.execute(f'SELECT count(*) FROM "{self.layer}" WHERE run_id = ?',
                                     (self.run_id,)).fetchone()[0])

    # -- one batch -----------------------------------------------------------------------------
    def commit_batch(self, tiles: Sequence[tuple[int, str]], boxes: Sequence[RawBox] = (),
                     replaced: Iterable[tuple[int, int]] = (), detections: Sequence[Detection] = (),
                     tile_rows: Sequence[tuple[Polygon, dict]] = (), common: dict | None = None,
                     clear: bool = False) -> None:
        """Write one batch atomically: tiles done, raw boxes, changed detections, tile features.

        ``replaced`` are keys of detections merged away; ``clear`` first removes all of this run's
        detections (a resumed run rewrites them from its raw boxes).
        """
        common = common or {}
        with self._transaction():
            self.conn.executemany("INSERT OR REPLACE INTO rs_lvlm_scan_tiles VALUES (?, ?, ?)",
                                  [(self.run_id, t, status) for t, status in tiles])
            self.conn.executemany(
                "INSERT OR REPLACE INTO rs_lvlm_scan_boxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(self.run_id, b.key[0], b.key[1], b.label, b.score, b.angle, int(b.cut), *b.px,
                  shapely.to_wkb(b.geom)) for b in boxes])
            if clear:
                self.conn.execute(f'DELETE FROM "{self.layer}" WHERE run_id = ?', (self.run_id,))
            gone = [f"{k[0]}:{k[1]}" for k in replaced] + [d.key_text for d in detections]
            if gone:
                self.conn.executemany(f'DELETE FROM "{self.layer}" WHERE run_id = ? AND det_key = ?',
                                      [(self.run_id, key) for key in gone])
            for d in detections:
                self._insert(d.geom, {**common, "label": d.label, "score": round(float(d.score), 6),
                                      "tile_id": d.tile_id, "parts": d.parts, "det_key": d.key_text})
            for geom, attrs in tile_rows:
                self._insert(geom, {**common, **attrs})
            self._update_extent()

    def _insert(self, geom: Polygon, attrs: dict) -> None:
        fields = [f for f in LAYER_FIELDS[self.layer] if f in attrs] + ["run_id"]
        values = [attrs[f] for f in fields[:-1]] + [self.run_id]
        cols = ", ".join(f'"{f}"' for f in ["geom"] + fields)
        marks = ", ".join("?" * (len(fields) + 1))
        self.conn.execute(f'INSERT INTO "{self.layer}" ({cols}) VALUES ({marks})',
                          [gpkg_blob(geom, self.srs_id)] + values)

    def _update_extent(self) -> None:
        """Keep gpkg_contents' extent and time current, so a GIS that opens the file mid-scan zooms right."""
        rtree = f"rtree_{self.layer}_geom"
        try:
            ext = self.conn.execute(f'SELECT min(minx), min(miny), max(maxx), max(maxy) FROM "{rtree}"').fetchone()
        except sqlite3.Error:
            ext = (None, None, None, None)
        self.conn.execute("UPDATE gpkg_contents SET min_x = ?, min_y = ?, max_x = ?, max_y = ?, "
                          "last_change = strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE table_name = ?",
                          (*ext, self.layer))

    def _transaction(self) -> "_Transaction":
        return _Transaction(self.conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the batch is then redone on resume)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as err:
                self.conn.execute("ROLLBACK")
                raise EngineError(EXPORT_FAILED, f"cannot write the scan's GeoPackage: {err}") from None
        else:
            self.conn.execute("ROLLBACK")


def read_layer(path: str | Path, layer: str, run_id: str | None = None) -> list[dict]:
    """A layer's features (attributes + ``wkt``), sorted, without fids: for comparing scans."""
    with sqlite3.connect(str(path)) as conn:
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{layer}")') if r[1] not in ("fid", "geom")]
        sql = f'SELECT geom, {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{layer}"'
        rows = conn.execute(sql + (" WHERE run_id = ?" if run_id else ""), (run_id,) if run_id else ()).fetchall()
    out = []
    for geom, *values in rows:
        env_size = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}[(geom[3] >> 1) & 0x07]
        out.append({"wkt": shapely.from_wkb(geom[8 + env_size:]).wkt, **dict(zip(cols, values))})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
