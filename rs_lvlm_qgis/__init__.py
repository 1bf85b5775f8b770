"""RS-LVLM: ask a remote-sensing vision-language model about a region of a raster, in QGIS.

QGIS calls :func:`classFactory` when the plugin is enabled.  Nothing heavy is imported here:
the plugin code is Qt/PyQGIS only and the model runs in a separate engine process.
"""


def classFactory(iface):  # noqa: N802 (name fixed by QGIS)
    """Create the plugin instance for QGIS's plugin manager."""
    from .plugin import RsLvlmPlugin  # pylint: disable=import-outside-toplevel

    return RsLvlmPlugin(iface)
