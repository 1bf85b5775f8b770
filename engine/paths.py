"""Where the engine finds its bundled resources.

The engine ships next to ``resources/`` both in the repository and inside the packaged plugin
zip (``rs_lvlm_qgis/engine`` beside ``rs_lvlm_qgis/resources``), so one relative rule serves
both; ``RS_LVLM_RESOURCES`` overrides it for unusual installs.
"""
from __future__ import annotations

import os
from pathlib import Path

RESOURCES_DIR: Path = Path(os.environ.get("RS_LVLM_RESOURCES", Path(__file__).resolve().parent.parent / "resources"))
DEFAULT_MODEL_DIR: Path = RESOURCES_DIR / "model"
SAMPLE_RASTER: Path = RESOURCES_DIR / "sample" / "sample_utm33n.tif"
KNOWLEDGE_DIR: Path = RESOURCES_DIR / "knowledge"
