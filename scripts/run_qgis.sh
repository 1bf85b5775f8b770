#!/usr/bin/env bash
# make qgis: QGIS with the plugin from the working tree and the sample raster loaded.
# Extra arguments go to scripts/run_qgis.py (e.g. --fresh, --raster FILE, -- <qgis args>).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/run_qgis.py "$@"
