#!/usr/bin/env bash
# Idempotent set-up: Debian's QGIS, the engine venv (.venv-engine) and the plugin test venv
# (.venv-qgis). Re-running it on a machine that already has everything only checks and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="qgis python3-qgis qgis-providers xvfb xauth python3-venv python3-pip"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:$missing"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
else
  echo "[setup] Debian packages present (qgis $(dpkg-query -W -f='${Version}' qgis))"
fi

# The engine's Python: 3.11 matches the local torch wheel; any 3.10-3.12 works with PyPI's.
ENGINE_BASE_PYTHON="${ENGINE_BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  FLAVOUR=cuda
else
  FLAVOUR=cpu
fi
REQ="requirements/engine-$FLAVOUR.txt"
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

ENGINE_STAMP=".venv-engine/.installed-$(stamp_of "$REQ" requirements/engine-test.txt)"
if [ ! -x .venv-engine/bin/python ]; then
  echo "[setup] creating .venv-engine with $ENGINE_BASE_PYTHON ($FLAVOUR)"
  "$ENGINE_BASE_PYTHON" -m venv .venv-engine
fi
if [ ! -f "$ENGINE_STAMP" ]; then
  echo "[setup] installing engine requirements ($REQ)"
  .venv-engine/bin/python -m pip install -q --upgrade pip
  .venv-engine/bin/python -m pip install -q -r "$REQ" -r requirements/engine-test.txt
  rm -f .venv-engine/.installed-*
  touch "$ENGINE_STAMP"
else
  echo "[setup] engine venv up to date ($FLAVOUR)"
fi

QGIS_STAMP=".venv-qgis/.installed-$(stamp_of requirements/plugin-test.txt)"
if [ ! -x .venv-qgis/bin/python ]; then
  echo "[setup] creating .venv-qgis on Debian's python3 (sees qgis and PyQt5)"
  /usr/bin/python3 -m venv --system-site-packages .venv-qgis
fi
if [ ! -f "$QGIS_STAMP" ]; then
  .venv-qgis/bin/python -m pip install -q -r requirements/plugin-test.txt
  rm -f .venv-qgis/.installed-*
  touch "$QGIS_STAMP"
else
  echo "[setup] plugin test venv up to date"
fi
.venv-qgis/bin/python -c "import qgis.core" || { echo "[setup] QGIS Python bindings do not import" >&2; exit 1; }
echo "[setup] done: engine python is .venv-engine/bin/python"
