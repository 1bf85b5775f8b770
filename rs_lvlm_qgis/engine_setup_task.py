"""Creating the per-user engine venv from inside QGIS, as a background QgsTask.

An analyst who installed the zip has QGIS but not torch.  This task makes a venv in the QGIS
profile folder (no admin rights needed, removed with the profile) and pip-installs the pinned
engine requirements shipped in ``requirements/``: the CUDA flavour when ``nvidia-smi`` works,
the CPU one otherwise.  It runs in a worker thread (pip takes minutes) and streams pip's output
line by line through :attr:`EngineSetupTask.logLine`, which Qt delivers to the GUI thread.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from . import paths
from .settings import venv_python

CPU_REQUIREMENTS = "engine-cpu.txt"
CUDA_REQUIREMENTS = "engine-cuda.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_cuda() -> bool:
    """True when an NVIDIA driver answers; the CUDA wheels are useless (and huge) otherwise."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=10, check=False
                              ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def requirements_file(cuda: Optional[bool] = None) -> Optional[Path]:
    """The requirements list to install: CUDA flavour if wanted and shipped, else CPU."""
    folder = paths.requirements_dir()
    if folder is None:
        return None
    cuda = has_cuda() if cuda is None else cuda
    for name in ((CUDA_REQUIREMENTS, CPU_REQUIREMENTS) if cuda else (CPU_REQUIREMENTS,)):
        if (folder / name).is_file():
            return folder / name
    return None


def extra_pip_args(requirements: Path) -> List[str]:
    """For the CPU flavour on Linux/Windows, also look at PyTorch's CPU wheel index: PyPI's
    torch wheels for those platforms bundle CUDA libraries (gigabytes) a CPU install never uses."""
    if requirements.name == CPU_REQUIREMENTS and sys.platform != "darwin":
        return ["--extra-index-url", TORCH_CPU_INDEX]
    return []


def base_python() -> Optional[str]:
    """A real Python interpreter to create the venv with.

    Inside QGIS ``sys.executable`` is often the QGIS binary itself, so it is only used when it
    looks like a Python; otherwise the interpreter next to QGIS's Python prefix (Windows/macOS
    bundles) or ``python3`` on the PATH (Linux distributions).
    """
    candidates: List[str] = []
    for attr in ("_base_executable", "executable"):
        exe = getattr(sys, attr, "") or ""
        if Path(exe).name.lower().startswith("python"):
            candidates.append(exe)
    prefix = Path(sys.exec_prefix)
    candidates += [str(prefix / "python.exe"), str(prefix / "bin" / "python3")]
    candidates += [shutil.which(name) or "" for name in ("python3", "python")]
    for exe in candidates:
        if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    return None


def clean_environment() -> dict:
    """The environment for venv/pip: without QGIS's Python and GDAL variables, which would
    otherwise leak QGIS's site-packages into the new venv's build steps."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONHOME", "PYTHONPATH", "LD_LIBRARY_PATH")
           and not k.startswith(("GDAL_", "PROJ_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class EngineSetupTask(QgsTask):
    """Create ``venv_dir`` and install ``requirements`` into it, streaming the log."""

    logLine = pyqtSignal(str)

    def __init__(self, venv_dir: Path, requirements: Path, python: Optional[str] = None,
                 extra_pip_args: Optional[List[str]] = None) -> None:
        super().__init__("RS-LVLM: set up the engine environment", QgsTask.CanCancel)
        self.venv_dir = Path(venv_dir)
        self.requirements = Path(requirements)
        self.python = python or base_python()
        self.extra_pip_args = list(extra_pip_args or [])
        self.error: str = ""
        self.log: List[str] = []
        self._proc: Optional[subprocess.Popen] = None

    def _emit(self, line: str) -> None:
        self.log.append(line)
        self.logLine.emit(line)

    def _run(self, args: List[str], lines_expected: int, start: float, span: float) -> bool:
        """Run one command, streaming its output and mapping its lines onto a progress span."""
        self._emit("$ " + " ".join(args))
        try:
            self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=clean_environment(),
                                          text=True, encoding="utf-8", errors="replace")
        except OSError as exc:
            self.error = f"Could not run {args[0]}: {exc}"
            return False
        seen = 0
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._emit(line.rstrip())
            seen += 1
            self.setProgress(start + span * min(1.0, seen / max(1, lines_expected)))
            if self.isCanceled():
                self._proc.terminate()
                self.error = "Cancelled."
                break
        code = self._proc.wait()
        self._proc.stdout.close()
        self._proc = None
        if self.isCanceled():
            return False
        if code != 0:
            self.error = f"{Path(args[0]).name} {' '.join(args[1:3])} failed with status {code}."
            return False
        return True

    def run(self) -> bool:  # runs in a worker thread
        if not self.python:
            self.error = "No Python interpreter was found to create the engine environment."
            return False
        if not self.requirements.is_file():
            self.error = f"Requirements file not found: {self.requirements}"
            return False
        self._emit(f"Creating {self.venv_dir} with {self.python}")
        self.venv_dir.parent.mkdir(parents=True, exist_ok=True)
        if not self._run([self.python, "-m", "venv", str(self.venv_dir)], 1, 0.0, 10.0):
            return False
        python = str(venv_python(self.venv_dir))
        wanted = [line for line in self.requirements.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
        pip = [python, "-m", "pip", "install", "--no-input", "-r", str(self.requirements)]
        if not self._run(pip + self.extra_pip_args, 4 * len(wanted) + 1, 10.0, 90.0):
            return False
        self.setProgress(100.0)
        self._emit("The engine environment is ready: " + python)
        return True

    def cancel(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        super().cancel()
