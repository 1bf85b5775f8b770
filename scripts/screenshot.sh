#!/usr/bin/env bash
# make screenshot: real QGIS desktop under Xvfb, the RS-LVLM dock showing an answer and the
# detections on the map, saved to docs/images/qgis_screenshot.png, with the dock's answer panel
# (dock_answer.png) and the knowledge base (knowledge_dialog.png) beside it; then the engine
# set-up dialog after a real failed offline set-up (engine_setup_offline.png). Needs the trained
# model and the sample raster. Fails (non-zero) if the engine gave no answer or no boxes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${RS_LVLM_SCREENSHOT_OUT:-$PWD/docs/images/qgis_screenshot.png}"
mkdir -p "$(dirname "$OUT")"
export RS_LVLM_SCREENSHOT_OUT="$OUT"
unset QT_QPA_PLATFORM  # a real X display (Xvfb), not offscreen
status=0
xvfb-run -a -s "-screen 0 1600x1000x24" \
    python3 scripts/run_qgis.py --fresh --profiles-path build/qgis-screenshot \
    --startup scripts/qgis_screenshot.py "$@" || status=$?
xvfb-run -a -s "-screen 0 1600x1000x24" \
    env QGIS_CUSTOM_CONFIG_PATH="$PWD/build/qgis-screenshot" \
    /usr/bin/python3 scripts/setup_screenshot.py "$(dirname "$OUT")/engine_setup_offline.png" || status=$?
exit "$status"
