"""Processing integration: the ``rs_lvlm`` provider and its algorithms (ask, detect, classify_tiles).

:func:`register` and :func:`unregister` are what the plugin calls; they are safe to call twice.
"""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsApplication

from .provider import PROVIDER_ID, RsLvlmProvider

__all__ = ["register", "unregister", "PROVIDER_ID"]


def register() -> Optional[RsLvlmProvider]:
    """Add the provider to QGIS's Processing registry (once); returns it."""
    registry = QgsApplication.processingRegistry()
    existing = registry.providerById(PROVIDER_ID)
    if existing is not None:
        return existing
    provider = RsLvlmProvider()
    registry.addProvider(provider)
    return provider


def unregister(provider: Optional[RsLvlmProvider] = None) -> None:
    """Remove the provider (the registered one when none is given)."""
    registry = QgsApplication.processingRegistry()
    provider = provider or registry.providerById(PROVIDER_ID)
    if provider is not None:
        registry.removeProvider(provider)
