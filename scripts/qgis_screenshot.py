"""Run inside real QGIS (``qgis --code``, see scripts/screenshot.sh): draw a region on the sample
raster, ask a grounding question, a caption and a question with a follow-up through the real
engine, wait for the map to render, save the main window to a PNG, then the dock's answer panel
and the knowledge base beside it, and quit (scripts/setup_screenshot.py adds the set-up dialog).

Exit status (the whole QGIS process): 0 saved with an answer and detections, 3 saved but the
engine gave no answer or no boxes, 4 timed out, 5 the script itself failed.  Settings come from
the environment: RS_LVLM_SCREENSHOT_OUT (PNG path), RS_LVLM_SCREENSHOT_TIMEOUT_S.
"""
import collections
import json
import os
import sys
import traceback

from qgis.core import QgsGeometry, QgsProject, QgsRasterLayer, QgsRectangle, QgsSettings
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication
from qgis.utils import iface, plugins

OUT = os.environ.get("RS_LVLM_SCREENSHOT_OUT", "docs/images/qgis_screenshot.png")
TIMEOUT_MS = int(float(os.environ.get("RS_LVLM_SCREENSHOT_TIMEOUT_S", "600")) * 1000)
FALLBACK_QUESTIONS = ("Locate all buildings.", "Locate all vehicles.", "")
FOLLOW_UPS = [("caption", ""), ("vqa", "How many buildings are there?"),
              ("vqa", "And how many of them are large?")]
MAX_TOKENS = int(os.environ.get("RS_LVLM_SCREENSHOT_MAX_TOKENS", "96"))


def target(raster):
    """The region and grounding questions: the sample's scene tile with the most objects
    (from the truth file written with the sample), else the central 80 % of the raster."""
    truth = raster.source() + ".truth.json"
    if os.path.isfile(truth):
        with open(truth, encoding="utf-8") as handle:
            tiles = [t for t in json.load(handle).get("tiles") or [] if t.get("objects")]
        if tiles:
            tile = max(tiles, key=lambda t: len(t["objects"]))
            classes = collections.Counter(o["cls"] for o in tile["objects"]).most_common(2)
            rect = QgsRectangle(*tile["bounds"])
            rect.scale(0.95)
            return rect, [f"Locate all {cls}s." for cls, _ in classes] + list(FALLBACK_QUESTIONS)
    rect = QgsRectangle(raster.extent())
    rect.scale(0.8)
    return rect, list(FALLBACK_QUESTIONS)


def _log(message):
    sys.stderr.write(f"[screenshot] {message}\n")
    sys.stderr.flush()


class ScreenshotRun:
    """A small state machine driven by the dock's answered/askFailed signals."""

    def __init__(self):
        self.plugin = plugins.get("rs_lvlm_qgis")
        self.dock = None
        self.pending = []
        self.boxes = 0
        self.answers = 0
        self.failed = ""
        self.phase = "ground"
        self.follow_ups = list(FOLLOW_UPS)
        self.done = False

    def start(self):
        if self.plugin is None:
            self.failed = "the plugin did not load"
            return self.finish()
        window = iface.mainWindow()
        window.resize(1600, 1000)
        window.showMaximized()
        self.dock = self.plugin.show_dock()
        self.dock.setMinimumWidth(400)
        rasters = [layer for layer in QgsProject.instance().mapLayers().values()
                   if isinstance(layer, QgsRasterLayer)]
        if not rasters:
            self.failed = "no raster layer is loaded"
            return self.finish()
        raster = rasters[0]
        QgsProject.instance().setCrs(raster.crs())
        canvas = iface.mapCanvas()
        canvas.setDestinationCrs(raster.crs())
        canvas.setExtent(raster.extent())
        canvas.refresh()
        self.dock.layerCombo.setLayer(raster)
        from rs_lvlm_qgis.region import RECTANGLE, Region  # the plugin is on sys.path in QGIS

        inner, questions = target(raster)
        self.pending = questions[:3]  # bounded: each try is a full generation
        QgsSettings().setValue("rs_lvlm/max_tokens", MAX_TOKENS)
        self.dock.set_region(Region(QgsGeometry.fromRect(inner), raster.crs(), RECTANGLE))
        self.dock.answered.connect(self.on_answered)
        self.dock.askFailed.connect(self.on_failed)
        QTimer.singleShot(TIMEOUT_MS, self.on_timeout)
        self.next_question()
        return None

    def ask(self, task, question):
        _log(f"asking {task}: {question!r}")
        self.dock.taskCombo.setCurrentIndex(self.dock.taskCombo.findData(task))
        self.dock.questionEdit.setCurrentText(question)
        if self.dock.ask() is None:
            self.failed = self.dock.statusLabel.text()
            self.finish()

    def next_question(self):
        if self.phase == "ground" and self.pending:
            self.ask("ground", self.pending.pop(0))
        else:
            self.phase = "final"
            self.ask(*self.follow_ups.pop(0))

    def on_answered(self, result):
        self.answers += 1
        if self.phase == "ground":
            self.boxes += len(result.get("boxes") or [])
            if self.boxes:
                self.phase = "final"
            QTimer.singleShot(0, self.next_question)
        elif self.follow_ups:
            QTimer.singleShot(0, self.next_question)
        else:
            QTimer.singleShot(0, self.finish)

    def on_failed(self, code, message):
        self.failed = f"{code}: {message}"
        QTimer.singleShot(0, self.finish)

    def on_timeout(self):
        if not self.done:
            self.failed = "timed out"
            self.finish(code=4)

    def finish(self, code=None):
        if self.done:
            return
        self.done = True
        canvas = iface.mapCanvas()
        canvas.refreshAllLayers()
        canvas.mapCanvasRefreshed.connect(lambda: QTimer.singleShot(1500, lambda: self.save(code)))
        QTimer.singleShot(15000, lambda: self.save(code))  # in case no refresh signal comes

    def save(self, code):
        if getattr(self, "saved", False):
            return
        self.saved = True
        os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
        ok = iface.mainWindow().grab().save(OUT, "PNG")
        _log(f"saved {OUT}: {ok}; answers={self.answers} boxes={self.boxes} "
             f"failure={self.failed or 'none'}")
        if code is None:
            code = 0 if ok and self.answers and self.boxes and not self.failed else 3
        self.exit_code = code
        try:
            self.save_views()
        except Exception:  # the main screenshot is saved; report the views and leave
            traceback.print_exc()
            self.leave()

    def _image(self, name):
        return os.path.join(os.path.dirname(os.path.abspath(OUT)), name)

    def save_views(self):
        """The answer panel and the knowledge base, one PNG each."""
        history = self.dock.results.historyList
        if history.count():  # the "Find objects" answer: its boxes listed, the first highlighted
            history.itemClicked.emit(history.item(0))
        self.dock.results.boxesList.setCurrentItem(self.dock.results.boxesList.topLevelItem(0))
        QApplication.processEvents()
        self.dock.grab().save(self._image("dock_answer.png"), "PNG")
        from rs_lvlm_qgis.knowledge_dialog import KnowledgeDialog

        knowledge = KnowledgeDialog(iface.mainWindow())
        knowledge.show()
        knowledge.searchEdit.setText("storage")
        knowledge.table.selectRow(0)
        knowledge.grab().save(self._image("knowledge_dialog.png"), "PNG")
        knowledge.close()
        self.leave()

    def leave(self):
        QgsProject.instance().setDirty(False)
        sys.stderr.flush()
        os._exit(self.exit_code)


def _start():
    try:
        run.start()
    except Exception:  # report and leave; a dialog would hang the headless run
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(5)


run = ScreenshotRun()
QTimer.singleShot(1500, _start)
