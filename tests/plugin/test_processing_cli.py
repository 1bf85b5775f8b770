"""``qgis_process run rs_lvlm:detect -- INPUT=... QUESTION=... OUTPUT=...`` from the shell.

The plugin is installed the way QGIS finds it (a folder on QGIS_PLUGINPATH holding rs_lvlm_qgis
with its metadata.txt, engine and resources, as the packaged zip lays them out), enabled with
``qgis_process plugins enable`` in a throw-away profile, and run by the real binary.  Debian's
``qgis_process`` wrapper adds ``--noversioncheck``, which 3.22 rejects, so the ``.bin`` beside it
is called.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import ENGINE_PYTHON, REPO, SAMPLE_RASTER, needs_model


def qgis_process_binary() -> str | None:
    wrapper = shutil.which("qgis_process")
    candidates = [shutil.which("qgis_process.bin"), wrapper + ".bin" if wrapper else None, wrapper]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


BINARY = qgis_process_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="qgis_process is not installed")


@pytest.fixture()
def installed(tmp_path: Path) -> dict:
    """A plugin folder and profile for qgis_process, and the environment that points at them."""
    plugin = tmp_path / "plugins" / "rs_lvlm_qgis"
    plugin.mkdir(parents=True)
    for entry in (REPO / "rs_lvlm_qgis").iterdir():
        if entry.name != "__pycache__":
            (plugin / entry.name).symlink_to(entry)
    for name in ("metadata.txt", "engine", "resources"):
        (plugin / name).symlink_to(REPO / name)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QGIS_PLUGINPATH": str(plugin.parent),
           "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "profile"), "RS_LVLM_ENGINE_PYTHON": str(ENGINE_PYTHON),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    enable = subprocess.run([BINARY, "plugins", "enable", "rs_lvlm_qgis"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    return env


def test_qgis_process_lists_the_rs_lvlm_algorithms(installed):
    listing = subprocess.run([BINARY, "list"], env=installed, capture_output=True, text=True, timeout=300)
    assert "rs_lvlm:detect" in listing.stdout and "rs_lvlm:classify_tiles" in listing.stdout
    assert "rs_lvlm:ask" in listing.stdout


@needs_model
def test_qgis_process_runs_detect_into_a_geopackage(installed, tmp_path):
    out = tmp_path / "detections.gpkg"
    run = subprocess.run([BINARY, "run", "rs_lvlm:detect", "--", f"INPUT={SAMPLE_RASTER}", "QUESTION=",
                          "TILE=256", f"OUTPUT={out}"], env=installed, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with sqlite3.connect(out) as conn:
        tables = [r[0] for r in conn.execute("SELECT table_name FROM gpkg_contents")]
        count = conn.execute(f'SELECT count(*) FROM "{tables[0]}"').fetchone()[0]
    assert count >= 1
