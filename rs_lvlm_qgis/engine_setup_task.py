"""Creating the per-user engine venv from inside QGIS, as a background QgsTask.

An analyst who installed the zip has QGIS but not torch.  This task makes a venv in the QGIS
profile folder (no admin rights needed, removed with the profile) and installs the engine's
hash-locked requirements (``requirements/engine-*.lock``: every package pinned with its hashes,
one index) from the package index or, offline, from a local folder of wheels prepared with
``scripts/download_wheels.sh`` (``pip --no-index --find-links DIR``).

Why atomic: a half-built venv is worse than none, because the plugin would find its interpreter
and fail on the first import.  So the venv is built in a temporary folder beside the target,
checked by importing the engine's libraries with it, and only then renamed into place (``python
-m`` finds a venv's site-packages from its own location, so the renamed venv works as is; only
its console scripts keep the old path, and the plugin never uses them).  Any failure removes
the temporary folder and leaves an existing venv untouched, and is said in one line.

Where QGIS's Python has no ``venv``/``ensurepip`` (some distribution and macOS builds), the venv
is created ``--without-pip`` and pip is bootstrapped from the pip wheel in the wheel folder;
failing that, the message says to point the plugin at any Python 3.10-3.12 environment holding
the engine requirements (README, "Installing the engine by hand").
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from qgis.PyQt.QtCore import pyqtSignal

from . import paths
from .settings import venv_python
from .subprocess_task import SubprocessTask

CPU_LOCK = "engine-cpu.lock"
CUDA_LOCK = "engine-cuda.lock"
CPU_REQUIREMENTS = "engine-cpu.txt"
CUDA_REQUIREMENTS = "engine-cuda.txt"
# The libraries the engine imports first: if these import, the venv is usable.
ENGINE_IMPORTS = ("numpy", "torch", "transformers", "safetensors", "faiss", "rasterio",
                  "shapely", "pyproj")
STAGING_TAG = ".building-"
# pip's defaults retry a dead network for about a minute; one quick retry says enough.
PIP_NETWORK_ARGS = ["--retries", "1", "--timeout", "15"]


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
    """The requirements to install: the hash-locked file of the flavour (CUDA if wanted and
    shipped, else CPU), falling back to the plain pinned list of an older package."""
    folder = paths.requirements_dir()
    if folder is None:
        return None
    cuda = has_cuda() if cuda is None else cuda
    names = (CUDA_LOCK, CPU_LOCK, CUDA_REQUIREMENTS, CPU_REQUIREMENTS) if cuda else \
        (CPU_LOCK, CPU_REQUIREMENTS)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


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
    """The environment for venv/pip: without QGIS's Python and GDAL variables (which would leak
    QGIS's site-packages into the new venv) and without ``PIP_*`` variables or any pip
    configuration file (``PIP_CONFIG_FILE`` set to the null device skips the global ones that
    ``--isolated`` still reads), so the lock's one index is the only source; proxy variables
    are kept."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONHOME", "PYTHONPATH", "LD_LIBRARY_PATH")
           and not k.startswith(("GDAL_", "PROJ_", "PIP_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def pip_install_args(requirements: Path, wheel_dir: Optional[Path] = None,
                     index_url: Optional[str] = None) -> List[str]:
    """The arguments after ``python -m pip``: isolated from the user's pip configuration,
    hash-checked for a lock file, from ``wheel_dir`` only when given, else from one index."""
    args = ["--isolated", "install", "--no-input", "-r", str(requirements)]
    if requirements.suffix == ".lock":
        args.append("--require-hashes")
    if wheel_dir is not None:
        args += ["--no-index", "--find-links", str(wheel_dir)]
    else:
        if index_url:
            args += ["--index-url", index_url]
        args += PIP_NETWORK_ARGS
    return args


_NETWORK = re.compile(r"NewConnectionError|Failed to establish a new connection|Connection refused|"
                      r"Name or service not known|Temporary failure in name resolution|"
                      r"Network is unreachable|ConnectTimeout|timed out|getaddrinfo failed|"
                      r"No route to host|ProxyError|SSLError|Could not fetch URL")
_NO_DIST = re.compile(r"No matching distribution found for (\S+)")
_NO_VENV = re.compile(r"ensurepip is not available|No module named (venv|ensurepip)")


def failure_line(log: Sequence[str], wheel_dir: Optional[Path] = None,
                 index_url: str = "") -> str:
    """One line saying what went wrong, from a failed command's output (never the raw log)."""
    text = "\n".join(log)
    missing = _NO_DIST.search(text)
    if wheel_dir is None and _NETWORK.search(text):
        where = index_url or "the package index"
        return (f"no network: {where} cannot be reached; install from a folder of wheels "
                "instead (prepared with scripts/download_wheels.sh on a connected machine).")
    if "DO NOT MATCH THE HASHES" in text or "require hashes" in text.lower() and "ERROR" in text:
        return "hash check failed: a downloaded package does not match the locked hash."
    if missing and wheel_dir is not None:
        return (f"missing wheel: {missing.group(1)} is not in {wheel_dir} "
                "(prepare the folder with scripts/download_wheels.sh).")
    if missing:
        return f"not installable: no package matches {missing.group(1)} for this Python."
    if "No space left on device" in text:
        return "disk full: there is not enough space for the engine environment."
    if _NO_VENV.search(text):
        return ("no venv: this Python cannot create virtual environments; see the README "
                "(\"Installing the engine by hand\").")
    errors = [line.strip() for line in log if line.strip().startswith("ERROR:")]
    if errors:
        return errors[-1][len("ERROR:"):].strip()[:300]
    tail = [line.strip() for line in log if line.strip() and not line.startswith("$ ")]
    return (tail[-1] if tail else "the command failed")[:300]


_INDEX_OPTION = re.compile(r"^\s*(--index-url|--extra-index-url|-i|--no-index|--find-links|-f)\b")


def without_index_options(requirements: Path, out: Path) -> Path:
    """A copy of ``requirements`` without index options: pip lets an ``--index-url`` line in
    the file override the command line, so a mirror or a wheel folder would be ignored."""
    lines = requirements.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(line for line in lines if not _INDEX_OPTION.match(line)) + "\n",
                   encoding="utf-8")
    return out


def staging_dir(venv_dir: Path) -> Path:
    """The temporary folder a new venv is built in: beside the target, so the final rename
    stays on one file system and is atomic."""
    return venv_dir.with_name(f".{venv_dir.name}{STAGING_TAG}{os.getpid()}-{int(time.time())}")


def remove_stale_staging(venv_dir: Path) -> None:
    """Remove temporary folders left by a set-up that was killed (QGIS closed mid-install)."""
    if not venv_dir.parent.is_dir():
        return
    for path in venv_dir.parent.glob(f".{venv_dir.name}{STAGING_TAG}*"):
        shutil.rmtree(path, ignore_errors=True)


def swap_in(staging: Path, venv_dir: Path) -> None:
    """Put the checked venv in place: the old one (if any) is moved aside first and removed
    only after the new one is in its place."""
    old = venv_dir.with_name(f".{venv_dir.name}.old-{os.getpid()}")
    if venv_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(venv_dir, old)
    try:
        os.replace(staging, venv_dir)
    except OSError:
        if old.exists():
            os.replace(old, venv_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class SetupParameters:
    """What to build: where, from which requirements, and from which source."""

    venv_dir: Path
    requirements: Path
    python: Optional[str] = None
    wheel_dir: Optional[Path] = None  # offline: install only from this folder of wheels
    index_url: Optional[str] = None  # another index than the lock's (a mirror; tests)
    import_check: Sequence[str] = ENGINE_IMPORTS
    extra_pip_args: List[str] = field(default_factory=list)


class EngineSetupTask(SubprocessTask):
    """Build the engine venv atomically, streaming the log through :attr:`logLine`."""

    logLine = pyqtSignal(str)

    def __init__(self, params: SetupParameters) -> None:
        super().__init__("RS-LVLM: set up the engine environment")
        self.params = params
        self.venv_dir = Path(params.venv_dir)
        self.python = params.python or base_python()
        self.error: str = ""
        self.log: List[str] = []

    def _emit(self, line: str) -> None:
        self.log.append(line)
        self.logLine.emit(line)

    def _run(self, args: List[str], lines_expected: int, start: float, span: float) -> bool:
        """Run one command, streaming its output and mapping its lines onto a progress span;
        on failure :attr:`error` holds one line about it."""
        self._emit("$ " + " ".join(args))
        first = len(self.log)
        try:
            self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=clean_environment(),
                                          text=True, encoding="utf-8", errors="replace")
        except OSError as exc:
            self.error = f"could not run {args[0]}: {exc}"
            return False
        seen = 0
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._emit(line.rstrip())
            seen += 1
            self.setProgress(start + span * min(1.0, seen / max(1, lines_expected)))
            if self.isCanceled():
                self._proc.terminate()
                break
        code = self._proc.wait()
        self._proc.stdout.close()
        self._proc = None
        if self.isCanceled():
            self.error = "cancelled."
            return False
        if code != 0:
            self.error = failure_line(self.log[first:], self.params.wheel_dir,
                                      self.params.index_url or "")
            return False
        return True

    def _create_venv(self, staging: Path) -> bool:
        """``python -m venv``; where ensurepip is missing, a venv without pip plus pip from
        the wheel folder."""
        assert self.python is not None
        if self._run([self.python, "-m", "venv", str(staging)], 1, 0.0, 8.0):
            return True
        if not _NO_VENV.search("\n".join(self.log)):
            return False
        shutil.rmtree(staging, ignore_errors=True)
        pip_wheels = sorted(Path(self.params.wheel_dir).glob("pip-*.whl")) \
            if self.params.wheel_dir else []
        if not pip_wheels:
            self.error = ("no venv: this Python lacks venv/ensurepip; install from a folder of "
                          "wheels that holds pip, or set up the engine by hand (README).")
            return False
        self._emit("ensurepip is missing: bootstrapping pip from " + str(pip_wheels[-1]))
        python = str(venv_python(staging))
        return (self._run([self.python, "-m", "venv", "--without-pip", str(staging)], 1, 0.0, 4.0)
                and self._run([python, str(pip_wheels[-1] / "pip"), "install", "--no-index",
                               "--find-links", str(self.params.wheel_dir), "pip"], 4, 4.0, 4.0))

    def _build(self, staging: Path) -> bool:
        if not self._create_venv(staging):
            return False
        python = str(venv_python(staging))
        requirements = self.params.requirements
        if self.params.wheel_dir is not None or self.params.index_url:
            requirements = without_index_options(requirements, staging / requirements.name)
        wanted = [line for line in requirements.read_text(encoding="utf-8").splitlines()
                  if "==" in line and not line.lstrip().startswith("#")]
        pip = [python, "-m", "pip"] + pip_install_args(requirements, self.params.wheel_dir,
                                                       self.params.index_url)
        if not self._run(pip + list(self.params.extra_pip_args), 4 * len(wanted) + 1, 8.0, 84.0):
            return False
        if self.params.import_check:
            modules = ", ".join(self.params.import_check)
            if not self._run([python, "-c", f"import {modules}"], 1, 92.0, 6.0):
                self.error = "import check failed: " + self.error
                return False
        return True

    def run(self) -> bool:  # runs in a worker thread
        if not self.python:
            self.error = "no Python interpreter was found to create the engine environment."
            return False
        if not self.params.requirements.is_file():
            self.error = f"requirements file not found: {self.params.requirements}"
            return False
        if self.params.wheel_dir is not None and not Path(self.params.wheel_dir).is_dir():
            self.error = f"wheel folder not found: {self.params.wheel_dir}"
            return False
        self.venv_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.venv_dir)
        staging = staging_dir(self.venv_dir)
        self._emit(f"Building the engine environment in {staging} with {self.python}")
        try:
            if not self._build(staging):
                return False
            swap_in(staging, self.venv_dir)
        except OSError as exc:
            self.error = f"could not put the environment in place: {exc}"
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.setProgress(100.0)
        self._emit("The engine environment is ready: " + str(venv_python(self.venv_dir)))
        return True
