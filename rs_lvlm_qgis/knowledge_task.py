"""Rebuilding the knowledge index in the background with the engine's own code.

The plugin never embeds text itself (that needs torch): it runs ``<engine python> -m engine
build-knowledge --entries FILE --out DIR`` in a QgsTask, with the same clean environment as the
engine process, and reads the one JSON line the command prints.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List


from .engine_setup_task import clean_environment
from .subprocess_task import SubprocessTask


@dataclass
class KnowledgeBuildParameters:
    """Which engine builds, from which extra entries, into which folder."""

    engine_python: str
    engine_root: Path
    entries_file: Path
    out_dir: Path
    device: str = "cpu"

    def command(self) -> List[str]:
        return [self.engine_python, "-m", "engine", "build-knowledge", "--entries",
                str(self.entries_file), "--out", str(self.out_dir), "--device", self.device]


class KnowledgeBuildTask(SubprocessTask):
    """Run ``build-knowledge``; :attr:`result` holds its JSON summary, :attr:`error` a line."""

    def __init__(self, params: KnowledgeBuildParameters) -> None:
        super().__init__("RS-LVLM: rebuild the knowledge index")
        self.params = params
        self.result: Dict[str, Any] = {}
        self.error = ""

    def run(self) -> bool:  # runs in a worker thread
        env = clean_environment()
        env["PYTHONPATH"] = str(self.params.engine_root)
        env["PYTHONUNBUFFERED"] = "1"
        self.setProgress(5.0)
        try:
            self._proc = subprocess.Popen(self.params.command(), cwd=str(self.params.engine_root),
                                          env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, encoding="utf-8", errors="replace")
            out, err = self._proc.communicate()
        except OSError as exc:
            self.error = f"could not run the engine: {exc}"
            return False
        code, self._proc = self._proc.returncode, None
        if self.isCanceled():
            self.error = "cancelled."
            return False
        if code != 0:
            lines = [line.strip() for line in err.splitlines() if line.strip()]
            self.error = (lines[-1] if lines else f"build-knowledge failed with status {code}")[:400]
            return False
        try:
            self.result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.error = "build-knowledge printed no summary."
            return False
        self.setProgress(100.0)
        return True

