"""rs-lvlm-qgis inference engine: raster windows, the RS-LVLM model, retrieval and the protocol server.

Runs in its own venv as ``python -m engine ...``; never imports Qt.
"""
__version__ = "0.1.0"
