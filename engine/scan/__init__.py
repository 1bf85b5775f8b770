"""Whole-raster scans: tiles at the model's scale, batched answers, seam merge, resumable output.

``tiling`` lays the tiles, ``runner`` puts batches through the loaded model (``ray_runner`` through
a Ray actor pool), ``merge`` joins boxes across tile seams and ``writer`` commits each batch to the
GeoPackage with the list of tiles done.  See docs/protocol.md ("Scan parameters") and docs/scale.md.
"""
from .runner import run_scan, scan_handler

__all__ = ["run_scan", "scan_handler"]
