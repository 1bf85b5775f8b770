#!/usr/bin/env python3
"""Build dist/rs_lvlm_qgis.zip, the archive QGIS's "Install from ZIP" takes.

Plain Python 3 (standard library only), so it runs anywhere ``make package`` does.  The zip has
one top folder ``rs_lvlm_qgis/`` holding metadata.txt, LICENSE, the plugin modules, the engine
package, the requirements lists and the resources (icons, knowledge base, sample raster and, when
trained, the model checkpoint).  What goes in is read from pb_tool.cfg, the one manifest.

The archive is reproducible: entries are sorted and carry a fixed timestamp, so the same tree
gives the same bytes.  Caches (__pycache__, *.pyc) and editor/OS litter never go in.
"""
from __future__ import annotations

import argparse
import configparser
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints", ".git"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".swp", ".orig", ".rej", ".tmp"}
SKIP_NAMES = {".DS_Store", "Thumbs.db"}
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author",
                     "email", "repository", "tracker", "tags", "icon")


def read_manifest(cfg_path: Path) -> Dict[str, List[str]]:
    """The file lists of pb_tool.cfg (whitespace-separated, continuation lines allowed)."""
    cfg = configparser.ConfigParser()
    cfg.read(cfg_path, encoding="utf-8")

    def items(key: str) -> List[str]:
        return cfg.get("files", key, fallback="").split()

    return {"name": [cfg.get("plugin", "name")], "python_files": items("python_files"),
            "extras": items("extras"), "extra_dirs": items("extra_dirs"),
            "optional_dirs": items("optional_dirs")}


def check_metadata(path: Path) -> configparser.ConfigParser:
    """Fail early on a metadata.txt QGIS or the plugin repository would reject."""
    meta = configparser.ConfigParser()
    meta.read(path, encoding="utf-8")
    missing = [key for key in REQUIRED_METADATA if not meta.get("general", key, fallback="").strip()]
    if missing:
        raise SystemExit(f"metadata.txt lacks: {', '.join(missing)}")
    return meta


def wanted(path: Path) -> bool:
    """Source files only: caches, editor litter and GDAL's .aux.xml statistics stay out."""
    return not (SKIP_PARTS & set(path.parts) or path.suffix in SKIP_SUFFIXES
                or path.name in SKIP_NAMES or path.name.endswith(".aux.xml"))


def collect(repo: Path, manifest: Dict[str, List[str]], include_model: bool) -> Dict[str, Path]:
    """Map of archive name (inside the top folder) -> source file."""
    files: Dict[str, Path] = {}
    plugin_src = repo / manifest["name"][0]
    for name in manifest["python_files"]:
        src = plugin_src / name
        if not src.is_file():
            raise SystemExit(f"pb_tool.cfg lists {name} but {src} does not exist")
        files[name] = src
    listed = set(manifest["python_files"])
    modules = (p.relative_to(plugin_src).as_posix() for p in plugin_src.rglob("*.py") if wanted(p.relative_to(repo)))
    unlisted = sorted(name for name in modules if name not in listed)  # subpackages too (processing/)
    if unlisted:
        raise SystemExit(f"plugin modules missing from pb_tool.cfg python_files: {unlisted}")
    for name in manifest["extras"]:
        src = repo / name
        if not src.is_file():
            raise SystemExit(f"pb_tool.cfg lists {name} but {src} does not exist")
        files[name] = src
    for folder in manifest["extra_dirs"]:
        src_dir = repo / folder
        if folder == "resources/model" and not include_model:
            continue
        if not src_dir.is_dir():
            if folder in manifest["optional_dirs"]:
                print(f"note: optional {folder}/ not present, not packaged", file=sys.stderr)
                continue
            raise SystemExit(f"pb_tool.cfg lists {folder}/ but {src_dir} does not exist")
        for src in sorted(src_dir.rglob("*")):
            if src.is_file() and wanted(src.relative_to(repo)):
                files[src.relative_to(repo).as_posix()] = src
    return files


def build(out: Path, repo: Path = REPO, include_model: bool = True) -> Path:
    manifest = read_manifest(repo / "pb_tool.cfg")
    meta = check_metadata(repo / "metadata.txt")
    icon = meta.get("general", "icon")
    files = collect(repo, manifest, include_model)
    if icon not in files:
        raise SystemExit(f"metadata.txt icon {icon} is not in the package")
    top = manifest["name"][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{top}/{name}", date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name].read_bytes())
    tmp.replace(out)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB, {len(files)} files, "
          f"version {meta.get('general', 'version')})")
    return out


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "rs_lvlm_qgis.zip")
    parser.add_argument("--no-model", action="store_true",
                        help="leave resources/model out (a smaller zip for quick checks)")
    args = parser.parse_args(argv)
    build(args.out, REPO, include_model=not args.no_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
