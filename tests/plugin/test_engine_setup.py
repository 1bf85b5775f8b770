"""Engine interpreter lookup and the venv set-up task: atomic, offline-capable, one line on
failure.  The venvs are real (``python -m venv`` and pip run); the packages are a tiny wheel
built here, so nothing is downloaded."""
from __future__ import annotations

import base64
import hashlib
import stat
import zipfile
from pathlib import Path

import pytest
from conftest import wait_until
from qgis.core import QgsApplication, QgsSettings, QgsTask

from rs_lvlm_qgis import settings
from rs_lvlm_qgis.engine_setup_task import (
    EngineSetupTask,
    SetupParameters,
    base_python,
    failure_line,
    pip_install_args,
    requirements_file,
)

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PIP_WHEELS = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))


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


def make_wheel(folder: Path, name: str = "rslvlm_tiny", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel (one module) that pip installs without any network."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "ANSWER = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for arc, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{arc},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def make_lock(path: Path, wheel: Path, name: str = "rslvlm_tiny", version: str = "0.1") -> Path:
    """A hash-locked requirements file for that wheel, with the index line the real lock has
    (what ``uv pip compile --generate-hashes --emit-index-url`` writes)."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    path.write_text("--index-url https://pypi.org/simple\n\n"  # as in the real lock
                    f"{name}=={version} \\\n    --hash=sha256:{digest}\n")
    return path


def run_task(params: SetupParameters, timeout_s: float = 240) -> EngineSetupTask:
    task = EngineSetupTask(params)
    QgsApplication.taskManager().addTask(task)
    assert wait_until(lambda: task.status() in (QgsTask.Complete, QgsTask.Terminated), timeout_s)
    return task


def leftovers(venv: Path) -> list:
    return [p.name for p in venv.parent.iterdir() if p.name.startswith("." + venv.name)]


def test_cpu_install_uses_the_hash_locked_requirements():
    path = requirements_file(cuda=False)
    assert path is not None and path.name == "engine-cpu.lock"


def lock_entries(text: str) -> dict:
    """``{"numpy==2.3.5": [its continuation lines]}`` of a pip-compile style lock file."""
    entries: dict = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith(("#", "-")):
            current = line.split(" ;")[0].split(" \\")[0].strip()
            entries[current] = [line]
        elif current is not None and line.strip():
            entries[current].append(line)
    return entries


def test_lock_pins_every_package_with_hashes_from_one_index():
    lock = (REPO / "requirements" / "engine-cpu.lock").read_text()
    options = [line for line in lock.splitlines() if line.startswith("-")]
    assert options == ["--index-url https://pypi.org/simple"]
    entries = lock_entries(lock)
    assert len(entries) > 40
    for pin, lines in entries.items():
        assert "==" in pin, pin
        assert any("--hash=sha256:" in line for line in lines), pin
    for package in ("torch==", "sentence-transformers==", "numpy=="):
        assert any(pin.startswith(package) for pin in entries), package


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_lock_holds_every_pin_of_the_requirements_list(flavour):
    """make lock is rerun whenever requirements/engine-*.txt changes."""
    import re

    wanted = set()
    for line in (REPO / "requirements" / f"engine-{flavour}.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^]]*\])?==(\S+)", line.strip())
        if match:
            wanted.add(f"{match.group(1).lower().replace('_', '-')}=={match.group(3)}")
    locked = {pin.lower() for pin in lock_entries(
        (REPO / "requirements" / f"engine-{flavour}.lock").read_text())}
    assert wanted - locked == set()


def test_pip_arguments_are_isolated_and_hash_checked_with_one_index(tmp_path):
    lock = tmp_path / "engine-cpu.lock"
    online = pip_install_args(lock)
    assert "--isolated" in online and "--require-hashes" in online
    assert "--extra-index-url" not in online
    offline = pip_install_args(lock, wheel_dir=tmp_path)
    assert offline[-3:] == ["--no-index", "--find-links", str(tmp_path)]


def test_pip_reads_no_configuration_of_this_machine(monkeypatch):
    import os

    from rs_lvlm_qgis.engine_setup_task import clean_environment

    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://elsewhere.example/simple")
    env = clean_environment()
    assert env["PIP_CONFIG_FILE"] == os.devnull  # also skips /etc/pip.conf, which --isolated reads
    assert "PIP_EXTRA_INDEX_URL" not in env


def test_offline_setup_installs_locked_wheels_from_a_folder_and_checks_imports(tmp_path):
    wheels = tmp_path / "wheels"
    lock = make_lock(tmp_path / "engine.lock", make_wheel(wheels))
    venv = tmp_path / "rs_lvlm" / "venv"
    task = run_task(SetupParameters(venv, lock, wheel_dir=wheels, import_check=("rslvlm_tiny",)))
    assert task.status() == QgsTask.Complete, task.error + "\n".join(task.log[-20:])
    assert settings.venv_python(venv).is_file()
    assert any("--no-index" in line and "--find-links" in line for line in task.log)
    assert task.log[-1].startswith("The engine environment is ready")
    assert leftovers(venv) == []  # the temporary build folder is gone


def test_unreachable_index_fails_in_one_line_and_leaves_no_venv(tmp_path):
    lock = make_lock(tmp_path / "engine.lock", make_wheel(tmp_path / "elsewhere"))
    venv = tmp_path / "rs_lvlm" / "venv"
    task = run_task(SetupParameters(venv, lock, index_url="http://127.0.0.1:9/",
                                    import_check=("rslvlm_tiny",)))
    assert task.status() == QgsTask.Terminated
    assert task.error.startswith("no network: http://127.0.0.1:9/ cannot be reached")
    assert "\n" not in task.error
    assert not venv.exists()  # nothing half-built for the plugin to pick up
    assert leftovers(venv) == []


def test_failed_rebuild_keeps_the_working_venv(tmp_path):
    wheels = tmp_path / "wheels"
    lock = make_lock(tmp_path / "engine.lock", make_wheel(wheels))
    venv = tmp_path / "rs_lvlm" / "venv"
    assert run_task(SetupParameters(venv, lock, wheel_dir=wheels,
                                    import_check=("rslvlm_tiny",))).status() == QgsTask.Complete
    broken = tmp_path / "broken.lock"
    broken.write_text("rslvlm_missing==9.9 --hash=sha256:" + "0" * 64 + "\n")
    task = run_task(SetupParameters(venv, broken, wheel_dir=wheels))
    assert task.status() == QgsTask.Terminated
    assert task.error.startswith("missing wheel: rslvlm_missing")
    assert (venv / "lib").is_dir() and settings.venv_python(venv).is_file()
    site = next(venv.glob("lib/python*/site-packages"))
    assert (site / "rslvlm_tiny" / "__init__.py").is_file()  # the old venv is untouched


def test_import_check_failure_means_no_venv(tmp_path):
    wheels = tmp_path / "wheels"
    lock = make_lock(tmp_path / "engine.lock", make_wheel(wheels))
    venv = tmp_path / "rs_lvlm" / "venv"
    task = run_task(SetupParameters(venv, lock, wheel_dir=wheels,
                                    import_check=("module_that_is_not_installed",)))
    assert task.status() == QgsTask.Terminated
    assert task.error.startswith("import check failed")
    assert not venv.exists()


@pytest.mark.skipif(not DEBIAN_PIP_WHEELS, reason="no pip wheel on this machine")
def test_python_without_ensurepip_gets_pip_from_the_wheel_folder(tmp_path):
    real = base_python()
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"  # a Python whose venv cannot bootstrap pip, as on some builds
                    "case \"$*\" in *--without-pip*) exec " + str(real) + " \"$@\";; esac\n"
                    "case \"$*\" in *'-m venv'*) echo 'Error: ensurepip is not available'; "
                    "exit 1;; esac\nexec " + str(real) + " \"$@\"\n")
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    lock = make_lock(tmp_path / "engine.lock", make_wheel(wheels))
    (wheels / DEBIAN_PIP_WHEELS[-1].name).write_bytes(DEBIAN_PIP_WHEELS[-1].read_bytes())
    venv = tmp_path / "rs_lvlm" / "venv"
    task = run_task(SetupParameters(venv, lock, python=str(fake), wheel_dir=wheels,
                                    import_check=("rslvlm_tiny",)))
    assert task.status() == QgsTask.Complete, task.error + "\n".join(task.log[-20:])
    assert any("bootstrapping pip" in line for line in task.log)


def test_failure_line_names_the_cause_not_the_log():
    log = ["Collecting numpy==2.3.5",
           "WARNING: Retrying (Retry(total=0)) after connection broken by "
           "'NewConnectionError(... Failed to establish a new connection: [Errno 111] "
           "Connection refused)': /simple/numpy/",
           "ERROR: No matching distribution found for numpy==2.3.5"]
    assert failure_line(log, index_url="https://pypi.org/simple").startswith(
        "no network: https://pypi.org/simple cannot be reached")
    assert failure_line(log[2:], wheel_dir=Path("/w")).startswith("missing wheel: numpy==2.3.5")


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


def test_setup_dialog_offers_the_per_user_venv_and_a_wheel_folder(tmp_path):
    from rs_lvlm_qgis.engine_setup_dialog import EngineSetupDialog

    dialog = EngineSetupDialog()
    try:
        assert str(settings.user_venv_dir()) in dialog.info.text()
        assert dialog.start_button.isEnabled()
        assert dialog.parameters().wheel_dir is None
        dialog.offline_check.setChecked(True)
        dialog.wheel_edit.setFilePath(str(tmp_path))
        assert dialog.parameters().wheel_dir == tmp_path
        assert not dialog.progress.isTextVisible()  # idle: no "0 %"
    finally:
        dialog.deleteLater()
