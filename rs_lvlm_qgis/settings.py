"""The plugin's persistent settings (QgsSettings) and the engine interpreter lookup.

Settings live under ``rs_lvlm/`` in the user's QGIS profile so that they follow the profile and
can be pre-seeded by administrators in ``QGIS3.ini``.  The engine interpreter is resolved in the
order the design contract fixes: the setting, then the environment variable
``RS_LVLM_ENGINE_PYTHON``, then the per-user venv under the profile folder (which the plugin
offers to create, see :mod:`engine_setup_task`).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from qgis.core import QgsApplication, QgsSettings

PREFIX = "rs_lvlm/"
KEY_ENGINE_PYTHON = PREFIX + "engine_python"
KEY_MODEL_DIR = PREFIX + "model_dir"
KEY_DEVICE = PREFIX + "device"
KEY_PRECISION = PREFIX + "precision"
KEY_MAX_TOKENS = PREFIX + "max_tokens"
KEY_TIMEOUT_S = PREFIX + "timeout_s"
KEY_HISTORY = PREFIX + "question_history"
KEY_MODEL_FOLDERS = PREFIX + "model_folders"
KEY_WHEEL_DIR = PREFIX + "wheel_dir"
KEY_KNOWLEDGE_FILE = PREFIX + "knowledge_entries"
KEY_KEEP_IN_PROJECT = PREFIX + "keep_in_project"

ENV_ENGINE_PYTHON = "RS_LVLM_ENGINE_PYTHON"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "float16", "bfloat16", "int8")
DEFAULT_MAX_TOKENS = 256
DEFAULT_TIMEOUT_S = 300
HISTORY_LENGTH = 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class EngineSettings:
    """A snapshot of the user's engine choices, read once per request so a change in the
    settings dialog applies to the next question without restarting anything."""

    engine_python: str = ""
    model_dir: str = ""
    device: str = "auto"
    precision: str = "auto"
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout_s: int = DEFAULT_TIMEOUT_S


def _int_value(settings: QgsSettings, key: str, default: int) -> int:
    """QSettings hands back strings from ini files; coerce defensively instead of crashing."""
    try:
        return int(settings.value(key, default))
    except (TypeError, ValueError):
        return default


def load() -> EngineSettings:
    """Read the current settings, falling back to defaults for missing or invalid values."""
    s = QgsSettings()
    device = str(s.value(KEY_DEVICE, "auto") or "auto")
    precision = str(s.value(KEY_PRECISION, "auto") or "auto")
    return EngineSettings(
        engine_python=str(s.value(KEY_ENGINE_PYTHON, "") or ""),
        model_dir=str(s.value(KEY_MODEL_DIR, "") or ""),
        device=device if device in DEVICES else "auto",
        precision=precision if precision in PRECISIONS else "auto",
        max_tokens=max(1, _int_value(s, KEY_MAX_TOKENS, DEFAULT_MAX_TOKENS)),
        timeout_s=max(5, _int_value(s, KEY_TIMEOUT_S, DEFAULT_TIMEOUT_S)),
    )


def save(values: EngineSettings) -> None:
    """Persist the settings dialog's values."""
    s = QgsSettings()
    s.setValue(KEY_ENGINE_PYTHON, values.engine_python)
    s.setValue(KEY_MODEL_DIR, values.model_dir)
    s.setValue(KEY_DEVICE, values.device)
    s.setValue(KEY_PRECISION, values.precision)
    s.setValue(KEY_MAX_TOKENS, int(values.max_tokens))
    s.setValue(KEY_TIMEOUT_S, int(values.timeout_s))


def user_venv_dir() -> Path:
    """The per-user engine venv: inside the active QGIS profile, so it needs no admin rights
    and is removed together with the profile."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "rs_lvlm" / "venv"


def venv_python(venv: Path) -> Path:
    """The interpreter inside a venv on this platform."""
    if sys.platform.startswith("win"):
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _usable(path: str) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_engine_python(values: Optional[EngineSettings] = None) -> Optional[str]:
    """The engine interpreter to run, or ``None`` when none is set up yet.

    Order: explicit setting, ``RS_LVLM_ENGINE_PYTHON``, per-user venv.  A configured path that
    does not exist is skipped rather than returned, so a stale setting does not hide a working
    venv; the dock then explains what is missing.
    """
    values = values or load()
    for candidate in (values.engine_python, os.environ.get(ENV_ENGINE_PYTHON, ""),
                      str(venv_python(user_venv_dir()))):
        if _usable(candidate):
            return candidate
    return None


def question_history() -> List[str]:
    """Previously asked questions, most recent first (stored as JSON: QSettings turns
    one-element lists into plain strings on some backends)."""
    return _json_list(KEY_HISTORY)[:HISTORY_LENGTH]


def remember_question(question: str) -> List[str]:
    """Put a question at the top of the history (deduplicated, bounded) and return the list."""
    question = question.strip()
    history = question_history()
    if question:
        history = [question] + [q for q in history if q != question]
    history = history[:HISTORY_LENGTH]
    QgsSettings().setValue(KEY_HISTORY, json.dumps(history))
    return history


def _json_list(key: str) -> List[str]:
    """A list stored as JSON (QSettings turns one-element lists into plain strings)."""
    raw = QgsSettings().value(key, "[]")
    try:
        items = json.loads(raw) if isinstance(raw, str) else list(raw or [])
    except ValueError:
        return []
    return [str(item) for item in items if str(item).strip()] if isinstance(items, list) else []


def model_folders() -> List[str]:
    """The model folders the analyst added in the settings (the embedded model is implicit)."""
    return _json_list(KEY_MODEL_FOLDERS)


def add_model_folder(path: str) -> List[str]:
    """Remember a model folder (deduplicated, in the order added) and return the list."""
    path = str(path).strip()
    folders = model_folders()
    if path and path not in folders:
        folders.append(path)
    QgsSettings().setValue(KEY_MODEL_FOLDERS, json.dumps(folders))
    return folders


def remove_model_folder(path: str) -> List[str]:
    """Forget a model folder; if it was the chosen model, fall back to the embedded one."""
    folders = [folder for folder in model_folders() if folder != path]
    s = QgsSettings()
    s.setValue(KEY_MODEL_FOLDERS, json.dumps(folders))
    if str(s.value(KEY_MODEL_DIR, "") or "") == path:
        s.setValue(KEY_MODEL_DIR, "")
    return folders


def model_folder_problem(path: str) -> str:
    """Why a folder is not a ready engine model ("" when it looks fine), from its files only:
    pickle weights without safetensors need ``engine convert``; no config.json is no model."""
    folder = Path(path)
    if not folder.is_dir():
        return "folder not found"
    try:
        names = [entry.name for entry in folder.iterdir() if entry.is_file()]
    except OSError:
        return "folder not readable"
    pickles = any(name.endswith(PICKLE_SUFFIXES) for name in names)
    if pickles and not any(name.endswith(".safetensors") for name in names):
        return "needs convert"
    if "config.json" not in names:
        return "not a model folder"
    return ""


def wheel_dir() -> str:
    """The folder of wheels the engine set-up installs from offline ("" = the package index)."""
    return str(QgsSettings().value(KEY_WHEEL_DIR, "") or "")


def set_wheel_dir(path: str) -> None:
    """Remember the offline wheel folder (or "" to go back to the package index)."""
    QgsSettings().setValue(KEY_WHEEL_DIR, str(path or ""))


def user_knowledge_file() -> Path:
    """The analyst's own knowledge entries (JSON lines), kept in the profile: the shipped
    entries stay read-only and a plugin update never overwrites the analyst's additions."""
    configured = str(QgsSettings().value(KEY_KNOWLEDGE_FILE, "") or "")
    if configured:
        return Path(configured)
    return Path(QgsApplication.qgisSettingsDirPath()) / "rs_lvlm" / "knowledge" / "entries.jsonl"


def user_knowledge_index() -> Path:
    """Where the knowledge index rebuilt with the analyst's entries is written."""
    return user_knowledge_file().parent / "index"


def engine_serve_arguments() -> List[str]:
    """Extra arguments of ``python -m engine serve``: the analyst's rebuilt knowledge index,
    once there is one, replaces the checkpoint's (the engine says in ``info`` which it uses)."""
    index = user_knowledge_index()
    return ["--knowledge", str(index)] if (index / "index.faiss").is_file() else []


def keep_in_project() -> bool:
    """Whether result layers are stored in the project's GeoPackage automatically."""
    return str(QgsSettings().value(KEY_KEEP_IN_PROJECT, "false")).lower() in ("true", "1")


def set_keep_in_project(on: bool) -> None:
    QgsSettings().setValue(KEY_KEEP_IN_PROJECT, "true" if on else "false")
