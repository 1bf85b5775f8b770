#!/usr/bin/env python3
"""Start QGIS with the plugin from the working tree and the sample raster loaded (``make qgis``).

Why a launcher and not "copy the plugin into my profile": the plugin must run from the working
tree so an edit is one "reload plugin" away, and the developer's real QGIS profile must not be
touched.  This script therefore

1. links the working tree into ``build/qgis-dev/plugins/rs_lvlm_qgis/`` (symlinks to every
   plugin module plus metadata.txt, LICENSE, engine/, requirements/ and resources/: exactly
   the layout of the packaged zip) and points ``QGIS_PLUGINPATH`` at it;
2. uses a separate profiles folder (``build/qgis-dev/profiles`` by default) in which the plugin
   is enabled;
3. sets ``RS_LVLM_ENGINE_PYTHON`` to the repository's ``.venv-engine`` interpreter (unless set);
4. runs ``qgis --code scripts/qgis_startup.py <sample raster>``; the start-up script opens the
   dock (``--startup`` replaces it, e.g. by the screenshot script).

Standard library only; run it with any Python 3.
"""
from __future__ import annotations

import argparse
import configparser
import os
import shutil
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
DEV_DIR = REPO / "build" / "qgis-dev"
SAMPLE = REPO / "resources" / "sample" / "sample_utm33n.tif"
LINKED = ("metadata.txt", "LICENSE", "engine", "requirements", "resources")


def link_plugin(plugins_dir: Path) -> Path:
    """(Re)create the symlinked plugin folder; new modules in the tree are picked up each run."""
    target = plugins_dir / "rs_lvlm_qgis"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for src in sorted((REPO / "rs_lvlm_qgis").iterdir()):
        if src.name != "__pycache__":
            (target / src.name).symlink_to(src)
    for name in LINKED:
        if (REPO / name).exists():
            (target / name).symlink_to(REPO / name)
    return target


def enable_plugin(profile_dir: Path, model_dir: str = "") -> Path:
    """Mark the plugin enabled (and QGIS's version check off) in the profile's QGIS3.ini, and
    seed the plugin's model-folder setting when one is given."""
    ini = profile_dir / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # QSettings keys are case-sensitive
    if ini.is_file():
        parser.read(ini, encoding="utf-8")
    values = [("PythonPlugins", "rs_lvlm_qgis", "true"), ("qgis", "checkVersion", "false"),
              ("qgis", "showTips", "false")]
    if model_dir:
        values.append(("rs_lvlm", "model_dir", str(Path(model_dir).resolve())))
    for section, key, value in values:
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value)
    with ini.open("w", encoding="utf-8") as handle:
        parser.write(handle, space_around_delimiters=False)
    return ini


def working_copy(raster: Path, folder: Path) -> Path:
    """Copy the raster (and its sidecars) out of the repository: QGIS writes .aux.xml
    statistics next to the rasters it opens, which must not litter resources/."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in raster.parent.glob(raster.name + "*"):
        if not src.name.endswith(".aux.xml"):
            shutil.copy2(src, folder / src.name)
    return folder / raster.name


def command(args: argparse.Namespace) -> List[str]:
    qgis = shutil.which(args.qgis) or args.qgis
    cmd = [qgis, "--profiles-path", str(args.profiles_path), "--nologo", "--noversioncheck",
           "--code", str(args.startup)]
    cmd += list(args.qgis_args)
    if args.raster and Path(args.raster).is_file():
        cmd.append(str(Path(args.raster).resolve()))
    return cmd


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles-path", type=Path, default=DEV_DIR / "profiles")
    parser.add_argument("--fresh", action="store_true", help="delete the dev profile first")
    parser.add_argument("--raster", default=str(SAMPLE), help="raster to open (default: sample)")
    parser.add_argument("--startup", type=Path, default=REPO / "scripts" / "qgis_startup.py",
                        help="Python file QGIS runs once started (--code)")
    parser.add_argument("--model", default="", help="model folder for the plugin (default: embedded)")
    parser.add_argument("--qgis", default=os.environ.get("QGIS_BIN", "qgis"))
    parser.add_argument("--dry-run", action="store_true", help="prepare and print, do not start")
    parser.add_argument("qgis_args", nargs="*", help="extra QGIS arguments (after --)")
    args = parser.parse_args(argv)
    args.profiles_path = args.profiles_path.resolve()
    if args.fresh and args.profiles_path.exists():
        shutil.rmtree(args.profiles_path)
    plugins_dir = DEV_DIR / "plugins"
    link_plugin(plugins_dir)
    enable_plugin(args.profiles_path / "profiles" / "default", args.model)
    env = dict(os.environ)
    env["QGIS_PLUGINPATH"] = os.pathsep.join(
        [str(plugins_dir)] + [p for p in env.get("QGIS_PLUGINPATH", "").split(os.pathsep) if p])
    engine_python = REPO / ".venv-engine" / "bin" / "python"
    if "RS_LVLM_ENGINE_PYTHON" not in env and engine_python.is_file():
        env["RS_LVLM_ENGINE_PYTHON"] = str(engine_python)
    if not Path(args.raster).is_file():
        print(f"note: {args.raster} does not exist (make sample); starting without it",
              file=sys.stderr)
    elif REPO in Path(args.raster).resolve().parents:
        args.raster = str(working_copy(Path(args.raster).resolve(), DEV_DIR / "data"))
    cmd = command(args)
    # QGIS's embedded Python finds its home by looking for python3 on PATH: make the one
    # installed next to QGIS win over pyenv/conda shims, or QGIS starts without its modules.
    qgis_bin_dir = str(Path(os.path.realpath(cmd[0])).parent)
    env["PATH"] = os.pathsep.join([qgis_bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep)
                                                     if p and p != qgis_bin_dir])
    print("QGIS_PLUGINPATH=" + env["QGIS_PLUGINPATH"], " ".join(cmd), file=sys.stderr)
    if args.dry_run:
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
