"""A scan request: the protocol's ``scan`` params (engine/protocol/schema.py) plus what only a scan run needs.

Why a subclass: the schema validates the params every caller shares (raster, task, region,
tile, overlap, batch...) once, at the edge; the run adds the polygon's CRS, where the batches
run (``ray``) and its run identity, which decides whether a scan resumes an earlier run or
appends a new one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.errors import BAD_REQUEST, EngineError
from engine.protocol.schema import SCAN_FIELDS, ScanParams, validate
from engine.tasks import split_task_token

__all__ = ["ScanRequest"]

_RESULT_KEYS = ("raster", "task", "question", "bbox", "bbox_crs", "region_wkt", "region_crs", "tile",
                "overlap", "min_score", "model", "max_tokens", "bands")
"""What changes a scan's results (its run id); batch size, device and Ray do not."""


@dataclass
class ScanRequest(ScanParams):
    region_crs: str | None = None
    ray: str | None = None           # None: in this process; "": a local Ray cluster; else its address
    ray_workers: int | None = None

    @classmethod
    def from_dict(cls, params: Any) -> "ScanRequest":
        values = validate(SCAN_FIELDS, params)
        if Path(values["out"]).suffix.lower() != ".gpkg":
            raise EngineError(BAD_REQUEST, f"a scan writes a GeoPackage: out must end in .gpkg, got {values['out']!r}")
        token_task, question = split_task_token(values["question"])
        if token_task is not None and token_task != values["task"]:
            raise EngineError(BAD_REQUEST, f"the question's task token says {token_task}, the scan's task is "
                                           f"{values['task']}")
        values["question"] = question or None
        region_crs = params.get("region_crs") or values["bbox_crs"]
        if region_crs is not None and not isinstance(region_crs, str):
            raise EngineError(BAD_REQUEST, "region_crs must be a string")
        ray = params.get("ray")
        if ray is not None and not isinstance(ray, (bool, str)):
            raise EngineError(BAD_REQUEST, "ray must be true, false or a cluster address")
        ray = None if ray is False or ray is None else ("" if ray is True or ray in ("", "local") else ray)
        workers = params.get("ray_workers")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 4096):
            raise EngineError(BAD_REQUEST, "ray_workers must be an integer between 1 and 4096")
        base = {f.name: values[f.name] for f in fields(ScanParams)}
        return cls(**base, region_crs=region_crs, ray=ray, ray_workers=workers)

    def run_id(self, raster_stamp: str, tile_px: int, overlap_px: int) -> str:
        """A short hash of what changes the results: same arguments, same id (a resume)."""
        key = {k: v for k, v in asdict(self).items() if k in _RESULT_KEYS}
        key.update(raster=_resolved(self.raster), raster_stamp=raster_stamp, tile=tile_px, overlap=overlap_px,
                   model=_resolved(self.model) if self.model else None)
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def _resolved(path: str) -> str:
    return path if "://" in path or path.startswith("/vsi") else str(Path(path).expanduser().resolve())
