"""Run by QGIS at start-up (``qgis --code``) from scripts/run_qgis.py: open the RS-LVLM dock on
the loaded raster, zoomed to it, so ``make qgis`` lands where an analyst starts asking."""
from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins


def _open_dock() -> None:
    plugin = plugins.get("rs_lvlm_qgis")
    if plugin is None:
        iface.messageBar().pushMessage("RS-LVLM", "The plugin did not load; see the Python log.",
                                       2, 0)
        return
    dock = plugin.show_dock()
    rasters = [layer for layer in QgsProject.instance().mapLayers().values()
               if isinstance(layer, QgsRasterLayer)]
    if rasters:
        QgsProject.instance().setCrs(rasters[0].crs())
        dock.layerCombo.setLayer(rasters[0])
        iface.mapCanvas().setExtent(rasters[0].extent())
        iface.mapCanvas().refresh()


QTimer.singleShot(500, _open_dock)
