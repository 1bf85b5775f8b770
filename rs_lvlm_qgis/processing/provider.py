"""The "RS-LVLM" Processing provider (id ``rs_lvlm``): the model's jobs as Processing algorithms.

Registered by the plugin when QGIS loads it (also inside ``qgis_process``), removed on unload.
"""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .. import paths
from .algorithms import AskAlgorithm, ClassifyTilesAlgorithm, DetectAlgorithm

__all__ = ["RsLvlmProvider", "PROVIDER_ID"]

PROVIDER_ID = "rs_lvlm"


class RsLvlmProvider(QgsProcessingProvider):
    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "RS-LVLM"

    def longName(self) -> str:  # noqa: N802 (QGIS API)
        return "RS-LVLM: remote-sensing vision-language model"

    def icon(self) -> QIcon:
        return QIcon(paths.icon_path())

    def loadAlgorithms(self) -> None:  # noqa: N802
        for alg in (AskAlgorithm(), DetectAlgorithm(), ClassifyTilesAlgorithm()):
            self.addAlgorithm(alg)
