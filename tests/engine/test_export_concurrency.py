"""Concurrent writers of one output file: real processes appending at once lose nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.geo.export import lock_path, read_features

REPO_ROOT = Path(__file__).resolve().parents[2]

# One writer: N appends of one feature each, counting the ones that raised.
WRITER = """
import json, sys
from engine.errors import EngineError
from engine.geo.export import write_features
path, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
failed = 0
for i in range(n):
    rec = {"wkt": "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))", "task": "caption", "answer": f"{tag}-{i}",
           "label": tag, "score": 1.0, "model": "test"}
    try:
        write_features(path, [rec], "EPSG:32633", layer="answers")
    except EngineError as exc:
        failed += 1
        print(exc.message, file=sys.stderr)
print(json.dumps({"failed": failed}))
"""


def run_writers(path: Path, writers: int, appends: int) -> list[int]:
    """Start ``writers`` processes at once, each appending ``appends`` features; their failures."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(appends), f"w{k}"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(writers)]
    failures = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode(errors="replace")
        failures.append(json.loads(out.decode().strip().splitlines()[-1])["failed"])
    return failures


@pytest.mark.parametrize("ext", ["gpkg", "shp", "geojson"])
def test_two_processes_appending_to_one_file_keep_every_feature(tmp_path, ext):
    path = tmp_path / f"answers.{ext}"
    failures = run_writers(path, writers=2, appends=12)
    features = read_features(path)
    assert failures == [0, 0]
    assert sorted(f["answer"] for f in features) == sorted(f"w{k}-{i}" for k in range(2) for i in range(12))


def test_the_lock_file_is_hidden_beside_the_output(tmp_path):
    assert lock_path(tmp_path / "out.gpkg") == tmp_path / ".out.gpkg.lock"
