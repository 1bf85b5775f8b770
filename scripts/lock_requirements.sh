#!/usr/bin/env bash
# make lock: hash-locked engine requirements (every package pinned with its sha256 hashes,
# PyPI as the one index, markers for every platform) from requirements/engine-*.txt. The
# plugin's in-QGIS installer and scripts/download_wheels.sh install from these lock files.
# Needs network; uv is installed into build/lock-tools on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-$(command -v uv || true)}"
if [ -z "$UV" ]; then
  if [ ! -x build/lock-tools/bin/uv ]; then
    python3 -m venv build/lock-tools
    build/lock-tools/bin/python -m pip install -q uv
  fi
  UV=build/lock-tools/bin/uv
fi
for flavour in cpu cuda; do
  src="requirements/engine-$flavour.txt"
  [ -f "$src" ] || continue
  # --no-config: no uv.toml or pip.conf index of this machine leaks into the lock.
  "$UV" pip compile "$src" --generate-hashes --universal --python-version 3.11 \
      --index-url https://pypi.org/simple --emit-index-url --no-config \
      -o "requirements/engine-$flavour.lock" -q
  echo "[lock] requirements/engine-$flavour.lock: $(grep -c '^[a-zA-Z0-9].*==' "requirements/engine-$flavour.lock") packages"
done
