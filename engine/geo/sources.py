"""Which raster sources the engine opens, and how it opens them: the engine's GDAL allow-list.

Why: GDAL will open nearly anything it is handed, and the raster path arrives over the protocol.
Left alone it would block forever on a FIFO (even after a cancel), read ``/dev/stdin`` (the
protocol's own input), fetch ``http://`` or ``/vsicurl/`` URLs, or follow a VRT to any of those.
So a source is opened only when it is:

* a **regular file** (symbolic links are followed, then checked), at most
  :data:`MAX_PATH_CHARS` characters long;
* or a GDAL **archive path** (``/vsizip/``, ``/vsitar/``, ``/vsigzip/``, ``/vsi7z/``,
  ``/vsirar/``) whose archive is a regular file;
* or a **network** source (``/vsicurl/``, ``/vsis3/``..., ``http(s)://``, ``ftp://``) only when
  ``RS_LVLM_ALLOW_NETWORK=1``;
* or any other GDAL connection string (subdatasets such as ``NETCDF:"f.nc":var``, directories)
  only when ``RS_LVLM_ALLOW_GDAL_PATHS=1``.

``/vsistdin/`` and ``/dev/*`` character devices are always refused.  A VRT's sources are checked
with the same rules before GDAL sees it (to :data:`MAX_VRT_DEPTH` levels, which also stops a
VRT that names itself).  Everything refused or unreadable is an :class:`EngineError` with a code,
never a traceback; :func:`read_errors` maps GDAL errors raised while reading pixels (corrupt
tiles) the same way.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from engine.errors import BAD_REQUEST, NOT_A_RASTER, RASTER_NOT_FOUND, EngineError

__all__ = ["MAX_PATH_CHARS", "check_source", "open_raster", "read_errors", "network_allowed"]

MAX_PATH_CHARS = 4096
MAX_VRT_DEPTH = 8
MAX_VRT_BYTES = 16 * 1024 * 1024

_ARCHIVES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")
_NETWORK = re.compile(r"^(/vsi(curl|curl_streaming|s3|s3_streaming|gs|gs_streaming|az|az_streaming|adls|"
                      r"oss|oss_streaming|swift|swift_streaming|webhdfs|hdfs)/|[a-z][a-z0-9+.-]*://)",
                      re.IGNORECASE)
_ALWAYS_REFUSED = ("/vsistdin", "/vsistdout", "/vsisubfile/", "/vsicrypt/", "/vsimem/")


def network_allowed() -> bool:
    """Network sources are opened only when the user set ``RS_LVLM_ALLOW_NETWORK=1``."""
    return os.environ.get("RS_LVLM_ALLOW_NETWORK", "") == "1"


def _gdal_paths_allowed() -> bool:
    return os.environ.get("RS_LVLM_ALLOW_GDAL_PATHS", "") == "1"


def _regular_file(text: str, what: str = "raster") -> Path:
    """``text`` as an existing regular file, else the coded error saying what it is instead."""
    path = Path(text).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise EngineError(RASTER_NOT_FOUND, f"{what} not found: {text}") from None
    except (OSError, ValueError) as exc:  # name too long, a NUL byte, permission denied...
        raise EngineError(RASTER_NOT_FOUND, f"{what} cannot be reached: {text[:200]} ({exc})") from None
    if stat.S_ISREG(info.st_mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket")
    if kind == "a folder" and _gdal_paths_allowed():
        return path
    raise EngineError(NOT_A_RASTER, f"{what} {text} is {kind}, not a regular file; the engine reads "
                                    "rasters from regular files only")


def check_source(raster: str | Path, what: str = "raster") -> Path | str:
    """The raster source as GDAL should open it, or the coded error that refuses it (see above).

    A local file comes back as a Path; a GDAL path as the string given (a Path would fold the
    double slash of ``/vsizip//abs/path.zip``)."""
    if not isinstance(raster, (str, Path)):
        raise EngineError(BAD_REQUEST, f"{what} must be a path (a string)")
    text = str(raster)
    if not text.strip():
        raise EngineError(BAD_REQUEST, f"{what} path is empty")
    if len(text) > MAX_PATH_CHARS:
        raise EngineError(BAD_REQUEST, f"{what} path is {len(text)} characters long; at most {MAX_PATH_CHARS}")
    if "\0" in text:
        raise EngineError(BAD_REQUEST, f"{what} path holds a NUL character")
    lowered = text.lower()
    if lowered.startswith(_ALWAYS_REFUSED) or lowered.startswith("/dev/"):
        raise EngineError(NOT_A_RASTER, f"{what} {text[:200]} is a stream or device, not a raster file")
    if _NETWORK.match(text) or any(_NETWORK.match(text[len(a):]) for a in _ARCHIVES if lowered.startswith(a)):
        if not network_allowed():
            raise EngineError(NOT_A_RASTER, f"{what} {text[:200]} is a network source; the engine opens "
                                            "network rasters only when RS_LVLM_ALLOW_NETWORK=1 is set")
        return text
    for prefix in _ARCHIVES:
        if lowered.startswith(prefix):
            _archive_file(text[len(prefix):], what)
            return text
    if lowered.startswith("/vsi") or (re.match(r"^[A-Za-z0-9_]{2,}:", text) and not Path(text).exists()):
        if _gdal_paths_allowed():
            return text
        raise EngineError(NOT_A_RASTER, f"{what} {text[:200]} is a GDAL connection string; the engine opens "
                                        "those only when RS_LVLM_ALLOW_GDAL_PATHS=1 is set")
    return _regular_file(text, what)


def _archive_file(inner: str, what: str) -> Path:
    """The archive named after ``/vsizip/`` (up to its ``.zip``/``.tar``... part), a regular file."""
    match = re.match(r"^(.*?\.(zip|tar|tgz|tar\.gz|gz|7z|rar|kmz))(/|$)", inner, re.IGNORECASE)
    return _regular_file(match.group(1) if match else inner.rstrip("/"), f"{what} archive")


def _check_vrt(path: Path, seen: tuple[str, ...] = ()) -> None:
    """Every source a VRT names obeys :func:`check_source`; nesting stops at MAX_VRT_DEPTH."""
    key = os.path.realpath(path)
    if key in seen:
        raise EngineError(NOT_A_RASTER, f"VRT {path} refers to itself (through {len(seen)} level(s))")
    if len(seen) >= MAX_VRT_DEPTH:
        raise EngineError(NOT_A_RASTER, f"VRT {path} nests more than {MAX_VRT_DEPTH} VRTs deep")
    try:
        if path.stat().st_size > MAX_VRT_BYTES:
            raise EngineError(NOT_A_RASTER, f"VRT {path} is larger than {MAX_VRT_BYTES} bytes")
        root = ET.fromstring(path.read_bytes())
    except (ET.ParseError, OSError, ValueError) as exc:
        raise EngineError(NOT_A_RASTER, f"VRT {path} is not readable XML: {exc}") from None
    for element in root.iter():
        if element.tag not in ("SourceFilename", "SourceDataset") or not (element.text or "").strip():
            continue
        name = element.text.strip()
        if element.get("relativeToVRT") == "1":  # otherwise GDAL, like this check, reads it from the cwd
            name = str(path.parent / name)
        source = check_source(name, "VRT source")
        if isinstance(source, Path) and source.suffix.lower() == ".vrt" and source.is_file():
            _check_vrt(source, seen + (key,))


def open_raster(path: Path | str) -> rasterio.io.DatasetReader:
    """Open an allowed source (see :func:`check_source`) as a raster with bands and pixels."""
    if isinstance(path, Path) and path.suffix.lower() == ".vrt" and path.is_file():
        _check_vrt(path)
    try:
        with warnings.catch_warnings():
            # Reported in Chip.warnings instead (see window._check_georef).
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except EngineError:
        raise
    except (RasterioError, OSError, ValueError, RecursionError) as exc:
        raise EngineError(NOT_A_RASTER, f"not a raster GDAL can read: {path} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - GDAL errors fiona/rasterio raise as they are
        raise EngineError(NOT_A_RASTER, f"not a raster GDAL can read: {path} ({type(exc).__name__}: {exc})") from None
    if ds.count < 1 or ds.width < 1 or ds.height < 1:
        ds.close()
        raise EngineError(NOT_A_RASTER, f"not a raster (no bands or no pixels): {path}")
    return ds


@contextlib.contextmanager
def read_errors(path: Path | str) -> Iterator[None]:
    """GDAL errors while reading pixels (a corrupt tile, a truncated file) as ``not_a_raster``."""
    try:
        yield
    except EngineError:
        raise
    except (RasterioError, OSError, ValueError, RecursionError, MemoryError) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc}" + (f": {cause}" if cause is not None else "")
        raise EngineError(NOT_A_RASTER, f"could not read the pixels of {path} ({detail[:300]})") from None
