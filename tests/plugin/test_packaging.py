"""The plugin zip, its metadata and manifest, and rules on the plugin's source code."""
from __future__ import annotations

import ast
import configparser
import json
import os
import re
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ENGINE_PYTHON, REPO, engine_available

PLUGIN_SRC = REPO / "rs_lvlm_qgis"
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author",
                     "email", "repository", "tracker", "tags", "icon")


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "rs_lvlm_qgis.zip"
    subprocess.run(["/usr/bin/python3", str(REPO / "scripts" / "package_plugin.py"),
                    "--out", str(out)], check=True, cwd=str(REPO), capture_output=True)
    return out


def test_zip_has_one_top_folder_with_metadata_code_engine_and_resources(built_zip):
    names = zipfile.ZipFile(built_zip).namelist()
    assert {name.split("/", 1)[0] for name in names} == {"rs_lvlm_qgis"}
    inside = {name.split("/", 1)[1] for name in names}
    for required in ("metadata.txt", "__init__.py", "plugin.py", "dock_widget.py", "LICENSE",
                     "engine/__init__.py", "engine/__main__.py", "requirements/engine-cpu.txt",
                     "resources/icons/rs_lvlm.svg", "resources/knowledge/entries.jsonl"):
        assert required in inside, required
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    if (REPO / "resources" / "sample" / "sample_utm33n.tif").is_file():
        assert "resources/sample/sample_utm33n.tif" in inside
    if (REPO / "resources" / "model" / "config.json").is_file():
        assert "resources/model/config.json" in inside


def test_metadata_has_fields_qgis_repository_requires():
    meta = configparser.ConfigParser()
    meta.read(REPO / "metadata.txt", encoding="utf-8")
    for key in REQUIRED_METADATA:
        assert meta.get("general", key, fallback="").strip(), key
    assert meta.get("general", "qgisMinimumVersion") == "3.22"
    assert meta.get("general", "version") == "0.1.0"
    assert meta.get("general", "author") == "rs-lvlm-qgis developers"
    assert meta.get("general", "repository") == "https://github.com/rs-lvlm-qgis/rs-lvlm-qgis"
    assert (REPO / meta.get("general", "icon")).is_file()


def test_pb_tool_cfg_lists_every_plugin_module_and_matches_zip(built_zip):
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "pb_tool.cfg", encoding="utf-8")
    assert cfg.get("plugin", "name") == "rs_lvlm_qgis"
    listed = set(cfg.get("files", "python_files").split())
    assert listed == {p.relative_to(PLUGIN_SRC).as_posix() for p in PLUGIN_SRC.rglob("*.py")
                      if "__pycache__" not in p.parts}
    inside = {n.split("/", 1)[1] for n in zipfile.ZipFile(built_zip).namelist()}
    assert listed | set(cfg.get("files", "extras").split()) <= inside
    optional = set(cfg.get("files", "optional_dirs").split())
    for folder in cfg.get("files", "extra_dirs").split():
        if folder not in optional or (REPO / folder).is_dir():
            assert any(n.startswith(folder + "/") for n in inside), folder


_PROFILE_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    plugins_dir = Path(sys.argv[1])
    sys.path.insert(0, "/usr/share/qgis/python")
    from pyplugin_installer.unzip import unzip  # QGIS's own "Install from ZIP" extraction
    unzip(sys.argv[2], str(plugins_dir))
    from qgis.core import QgsApplication
    app = QgsApplication([], True)
    app.initQgis()
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtCore import QCoreApplication, QObject
    from qgis.PyQt.QtWidgets import QMainWindow
    import qgis.utils

    class Iface(QObject):
        def __init__(self):
            super().__init__()
            self.window = QMainWindow()
            self.canvas = QgsMapCanvas(self.window)
            self.window.setCentralWidget(self.canvas)
            self.bar = QgsMessageBar(self.window)
        def mainWindow(self): return self.window
        def mapCanvas(self): return self.canvas
        def messageBar(self): return self.bar
        def addToolBarIcon(self, action): self.window.addAction(action)
        def removeToolBarIcon(self, action): self.window.removeAction(action)
        def addPluginToMenu(self, menu, action): pass
        def removePluginMenu(self, menu, action): pass
        def addDockWidget(self, area, dock): self.window.addDockWidget(area, dock)
        def removeDockWidget(self, dock): self.window.removeDockWidget(dock)

    qgis.utils.iface = Iface()
    qgis.utils.plugin_paths = [str(plugins_dir)]
    sys.path.insert(0, str(plugins_dir))  # as QGIS does for each plugin folder at start-up
    qgis.utils.updateAvailablePlugins()
    out = {"available": "rs_lvlm_qgis" in qgis.utils.available_plugins,
           "name": qgis.utils.pluginMetadata("rs_lvlm_qgis", "name"),
           "loaded": qgis.utils.loadPlugin("rs_lvlm_qgis")}
    out["started"] = qgis.utils.startPlugin("rs_lvlm_qgis")
    import rs_lvlm_qgis
    from rs_lvlm_qgis import paths
    out["module"] = rs_lvlm_qgis.__file__
    out["engine_root"] = str(paths.engine_root())
    out["resources"] = str(paths.resources_dir())
    plugin = qgis.utils.plugins["rs_lvlm_qgis"]
    if os.environ.get("RS_LVLM_ENGINE_PYTHON"):
        dock = plugin.show_dock()
        req = plugin.client.request("info")
        end = time.monotonic() + 120
        while not req.finished and time.monotonic() < end:
            QCoreApplication.processEvents()
            time.sleep(0.01)
        out["info_error"] = req.error
        out["engine_version"] = (req.result or {}).get("engine_version")
        out["model_path"] = ((req.result or {}).get("model") or {}).get("path")
    out["unloaded"] = qgis.utils.unloadPlugin("rs_lvlm_qgis")
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()
    os._exit(0)
''')


def test_zip_unpacked_into_fresh_profile_loads_and_starts(built_zip, tmp_path):
    plugins_dir = tmp_path / "profiles" / "default" / "python" / "plugins"
    script = tmp_path / "load_from_profile.py"
    script.write_text(_PROFILE_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "profiles"))
    if engine_available:
        env["RS_LVLM_ENGINE_PYTHON"] = str(ENGINE_PYTHON)
    proc = subprocess.run(["/usr/bin/python3", str(script), str(plugins_dir), str(built_zip)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    plugin_folder = plugins_dir / "rs_lvlm_qgis"
    assert out["available"] and out["name"] == "RS-LVLM"
    assert out["loaded"] and out["started"] and out["unloaded"]
    assert Path(out["module"]).parent == plugin_folder  # not the repository's copy
    assert Path(out["engine_root"]) == plugin_folder  # engine found inside the plugin folder
    assert Path(out["resources"]) == plugin_folder / "resources"
    if engine_available:
        assert out["info_error"] is None, out
        assert out["engine_version"]
        assert Path(out["model_path"]).parent == plugin_folder / "resources"


def _plugin_sources():
    return sorted(PLUGIN_SRC.rglob("*.py"))


def test_plugin_sources_contain_no_eval_or_exec():
    offenders = []
    for path in _plugin_sources():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r"\b(eval|exec)\s*\(", line) and not re.search(r"\bexec_\(", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("eval", "exec", "compile", "__import__"):
                offenders.append(f"{path.name}:{node.lineno}: call to {node.func.id}")
    assert offenders == []


def test_plugin_never_imports_torch_or_the_engine():
    forbidden = ("torch", "engine", "transformers", "faiss", "rasterio", "onnxruntime")
    offenders = []
    for path in _plugin_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []


def test_plugin_modules_stay_under_500_lines():
    assert {p.name: n for p in _plugin_sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= 500} == {}
