"""Errors the engine reports to its callers.

Every failure a user can cause (bad file, region off the raster, missing model...) is raised as
an :class:`EngineError` with a stable machine-readable ``code``; the protocol server turns it into
an ``{"type": "error", "error": {"code", "message"}}`` reply and the CLI into a one-line message on
stderr with a non-zero exit status.  Anything else is a bug and is reported as ``internal``.
"""
from __future__ import annotations

# Stable error codes (the plugin and outside checks match on them).
BAD_REQUEST = "bad_request"            # malformed JSON, unknown method, wrong param types
RASTER_NOT_FOUND = "raster_not_found"  # the file does not exist
NOT_A_RASTER = "not_a_raster"          # GDAL cannot open it as a raster
UNSUPPORTED_RASTER = "unsupported_raster"  # opens, but has no geotransform we can use (GCPs/RPCs only)
UNKNOWN_CRS = "unknown_crs"            # a CRS string that PROJ does not understand
REGION_OFF_RASTER = "region_off_raster"
EMPTY_REGION = "empty_region"          # zero area, or nothing valid left after clipping
TOO_MANY_BANDS = "too_many_bands"      # band selection beyond the raster's band count
NO_MODEL = "no_model"                  # no checkpoint at the model path
BAD_CHECKPOINT = "bad_checkpoint"      # pickle files, truncated or mismatched safetensors
CANCELLED = "cancelled"
EXPORT_FAILED = "export_failed"
INTERNAL = "internal"


class EngineError(Exception):
    """A failure with a stable code and a message meant for the analyst, not a traceback."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}
