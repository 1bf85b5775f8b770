"""Where the plugin finds the engine package and the bundled resources.

The same plugin code runs from two layouts:

* the repository: ``<repo>/rs_lvlm_qgis/`` with ``engine/``, ``resources/`` and
  ``requirements/`` beside it (also the layout ``scripts/run_qgis.py`` symlinks into a dev
  profile);
* the packaged zip: ``<plugins>/rs_lvlm_qgis/`` with ``engine/``, ``resources/`` and
  ``requirements/`` inside it.

Both are probed, inside first, so an installed zip never picks up a stray checkout; the
resolved (symlink-free) location is probed last so a symlinked dev install still finds the repo.
Nothing here imports the engine: the plugin only needs to know which folder to hand the engine
subprocess as its working directory and ``PYTHONPATH``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

PLUGIN_NAME = "rs_lvlm_qgis"
ICON_FILE = "rs_lvlm.svg"


def plugin_dir() -> Path:
    """The folder this module lives in, as QGIS imported it (symlinks not resolved)."""
    return Path(__file__).absolute().parent


def _candidate_roots() -> Iterator[Path]:
    """Folders that may hold ``engine/`` and ``resources/``, most specific first."""
    seen: set = set()
    here = plugin_dir()
    for candidate in (here, here.parent, here.resolve(), here.resolve().parent):
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


def engine_root() -> Optional[Path]:
    """The folder that contains the ``engine`` package, i.e. what ``python -m engine`` needs on
    its path; ``None`` if the engine is not shipped (a broken install)."""
    for root in _candidate_roots():
        if (root / "engine" / "__init__.py").is_file():
            return root
    return None


def resources_dir() -> Optional[Path]:
    """The bundled ``resources/`` folder (icons, sample raster, knowledge base, model)."""
    for root in _candidate_roots():
        if (root / "resources").is_dir():
            return root / "resources"
    return None


def requirements_dir() -> Optional[Path]:
    """The ``requirements/`` folder with the engine's pinned dependency lists."""
    for root in _candidate_roots():
        if (root / "requirements").is_dir():
            return root / "requirements"
    return None


def icon_path() -> str:
    """Path of the plugin icon as a string for ``QIcon`` (empty if missing, which Qt tolerates)."""
    res = resources_dir()
    if res is not None and (res / "icons" / ICON_FILE).is_file():
        return str(res / "icons" / ICON_FILE)
    return ""


def sample_raster() -> Optional[Path]:
    """The bundled sample GeoTIFF, if this install ships one."""
    res = resources_dir()
    if res is None:
        return None
    path = res / "sample" / "sample_utm33n.tif"
    return path if path.is_file() else None


def default_model_dir() -> Optional[Path]:
    """The embedded checkpoint folder (``resources/model``) if it holds a ``config.json``."""
    res = resources_dir()
    if res is not None and (res / "model" / "config.json").is_file():
        return res / "model"
    return None
