#!/usr/bin/env bash
# make wheels: on a machine with network access, download every wheel of the engine's locked
# requirements (hash-checked) plus pip itself into one folder, for the plugin's offline set-up
# ("Install from a folder of wheels" in the engine set-up dialog: pip --no-index --find-links).
#
#   scripts/download_wheels.sh [DIR] [pip download options]
#   scripts/download_wheels.sh wheels-win --platform win_amd64 --python-version 3.12
#
# DIR defaults to build/wheels. Without --platform the wheels match this machine; for another
# machine give its platform tag and Python version (only binary wheels are taken, so no
# package is built here). Copy DIR to the offline machine and choose it in the dialog.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-build/wheels}"
shift || true
LOCK="${RS_LVLM_LOCK:-requirements/engine-cpu.lock}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
echo "[wheels] $LOCK -> $OUT"
# --isolated: the lock's one index only, whatever pip.conf or PIP_* say on this machine.
"$PYTHON" -m pip --isolated download --require-hashes --only-binary=:all: \
    -r "$LOCK" -d "$OUT" "$@"
# pip itself, for Pythons whose venv module lacks ensurepip (the set-up bootstraps it from here).
"$PYTHON" -m pip --isolated download --only-binary=:all: --no-deps pip -d "$OUT" "$@"
echo "[wheels] $(ls "$OUT" | wc -l) files in $OUT"
