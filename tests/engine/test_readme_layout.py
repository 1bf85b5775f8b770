"""The README's layout table names only what is in the tree, and every engine package is in it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLE = README[README.index("## Layout"):].split("\n\n")[1]


def test_every_path_in_the_layout_table_exists():
    rows = [line.split("|")[1:3] for line in TABLE.splitlines() if line.startswith("| `")]
    for first, second in rows:
        for path in re.findall(r"`([^`]+)`", first):
            assert (ROOT / path).exists(), path
        folders = re.findall(r"`([^`]+/)`", first)
        for name in re.findall(r"`([a-z_]+\.py)`", second) if folders else ():
            assert any((ROOT / f / name).exists() for f in folders), f"{name} is not in {folders}"


def test_every_engine_package_is_in_the_layout_table():
    packages = sorted(p.parent.name for p in (ROOT / "engine").glob("*/__init__.py"))
    assert all(f"`engine/{name}/`" in TABLE for name in packages), packages
