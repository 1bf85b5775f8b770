"""The engine set-up dialog after a real failed offline set-up, saved as a PNG (make screenshot).

Runs the plugin's EngineSetupDialog with QGIS's Python (a real QgsApplication, no QGIS window)
and starts the real set-up task against an index that cannot be reached, in a temporary folder
(never the per-user venv): what an analyst without network sees.  Usage:
``python3 scripts/setup_screenshot.py OUT.png``.
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgis.core import QgsApplication  # noqa: E402


def main(out: str) -> None:
    app = QgsApplication([], True)
    app.initQgis()
    from rs_lvlm_qgis.engine_setup_dialog import EngineSetupDialog

    dialog = EngineSetupDialog()
    dialog.resize(760, 480)
    dialog.show()
    folder = Path(tempfile.mkdtemp())
    params = dialog.parameters()
    params.venv_dir = folder / "venv"
    params.index_url = "http://127.0.0.1:9/"  # no network
    task = dialog.start(params)
    done = []
    task.taskCompleted.connect(lambda: done.append(True))
    task.taskTerminated.connect(lambda: done.append(False))
    end = time.monotonic() + 300
    while not done and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    ok = dialog.grab().save(out, "PNG")
    print(f"[screenshot] saved {out}: {ok}; {dialog.summary.text()}", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    sys.stderr.flush()
    # leave without Qt/QGIS teardown (it can crash after a headless run), dialog still alive
    os._exit(0 if ok and done == [False] else 3)


if __name__ == "__main__":
    main(sys.argv[1])
