"""Engine interpreter lookup and the venv set-up task."""
from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from conftest import wait_until
from qgis.core import QgsApplication, QgsSettings, QgsTask

from rs_lvlm_qgis import settings
from rs_lvlm_qgis.engine_setup_task import EngineSetupTask, requirements_file


def _fake_python(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture()
def clean_settings():
    QgsSettings().remove(settings.KEY_ENGINE_PYTHON)
    yield
    QgsSettings().remove(settings.KEY_ENGINE_PYTHON)


def test_interpreter_lookup_prefers_setting_then_env_then_user_venv(tmp_path, monkeypatch,
                                                                   clean_settings):
    venv_python = settings.venv_python(settings.user_venv_dir())
    created_venv = not venv_python.exists()
    try:
        user = _fake_python(venv_python)
        assert settings.resolve_engine_python() == user
        env = _fake_python(tmp_path / "env" / "python")
        monkeypatch.setenv(settings.ENV_ENGINE_PYTHON, env)
        assert settings.resolve_engine_python() == env
        configured = _fake_python(tmp_path / "configured" / "python")
        QgsSettings().setValue(settings.KEY_ENGINE_PYTHON, configured)
        assert settings.resolve_engine_python() == configured
        QgsSettings().setValue(settings.KEY_ENGINE_PYTHON, str(tmp_path / "missing" / "python"))
        assert settings.resolve_engine_python() == env  # a stale setting is skipped
    finally:
        if created_venv:
            venv_python.unlink()


def test_no_interpreter_anywhere_resolves_to_none(clean_settings):
    if settings.venv_python(settings.user_venv_dir()).exists():
        pytest.skip("a per-user engine venv exists in this test profile")
    assert settings.resolve_engine_python() is None


def test_cpu_requirements_are_chosen_without_nvidia_driver():
    path = requirements_file(cuda=False)
    assert path is not None and path.name == "engine-cpu.txt"


def test_setup_task_creates_venv_and_streams_pip_log(tmp_path):
    requirements = tmp_path / "engine-test-requirements.txt"
    requirements.write_text("# nothing to install: checks the venv + pip mechanics offline\n")
    venv = tmp_path / "rs_lvlm" / "venv"
    task = EngineSetupTask(venv, requirements, extra_pip_args=["--no-index"])
    lines = []
    task.logLine.connect(lines.append)
    QgsApplication.taskManager().addTask(task)
    assert wait_until(lambda: task.status() in (QgsTask.Complete, QgsTask.Terminated), 180)
    assert task.status() == QgsTask.Complete, task.error + "\n".join(task.log[-20:])
    assert settings.venv_python(venv).is_file()
    assert any(line.startswith("$ ") and "pip install" in line for line in lines)
    assert lines[-1].startswith("The engine environment is ready")


def test_settings_dialog_saves_engine_choices(tmp_path, clean_settings):
    from rs_lvlm_qgis.settings_dialog import SettingsDialog

    dialog = SettingsDialog()
    dialog.python_edit.setFilePath(str(tmp_path / "python"))
    dialog.add_model_folder(str(tmp_path / "model"))
    dialog.device_combo.setCurrentText("cpu")
    dialog.precision_combo.setCurrentText("float32")
    dialog.tokens_spin.setValue(99)
    dialog.accept()
    values = settings.load()
    try:
        assert values.engine_python == str(tmp_path / "python")
        assert values.model_dir == str(tmp_path / "model")
        assert (values.device, values.precision, values.max_tokens) == ("cpu", "float32", 99)
    finally:
        settings.save(settings.EngineSettings())
        QgsSettings().remove(settings.KEY_MODEL_FOLDERS)


def test_setup_dialog_offers_the_per_user_venv_with_cpu_torch_index():
    from rs_lvlm_qgis.engine_setup_task import extra_pip_args
    from rs_lvlm_qgis.settings_dialog import EngineSetupDialog

    dialog = EngineSetupDialog()
    assert str(settings.user_venv_dir()) in dialog.info.text()
    assert dialog.start_button.isEnabled()
    cpu = requirements_file(cuda=False)
    if sys.platform != "darwin":
        assert "--extra-index-url" in extra_pip_args(cpu)
    dialog.deleteLater()
