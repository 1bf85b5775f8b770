"""The dock's export row: export a result layer, and keep the scratch layers in the project.

Kept out of the dock so the dock stays about asking.  An export proposes a file name from the
raster and the time and adds the written file to the map; "Keep in project GeoPackage" turns
the memory layers into layers of ``<project>_rs_lvlm_<crs>.gpkg`` after every answer, so results
survive closing QGIS without the analyst remembering to export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qgis.core import Qgis
from qgis.PyQt.QtWidgets import QCheckBox, QFileDialog, QGridLayout, QPushButton, QWidget

from . import export, result_layers, settings

KINDS = {"answers": result_layers.ANSWERS_LAYER, "detections": result_layers.DETECTIONS_LAYER}


class ExportBar(QWidget):
    """Export buttons and the keep-in-project option; ``dock`` provides ``show_message``,
    ``last_layers``, ``results`` and the raster of the last question."""

    def __init__(self, dock: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.dock = dock
        self.exportAnswersButton = QPushButton("Export answers…", self)
        self.exportAnswersButton.setObjectName("exportAnswersButton")
        self.exportDetectionsButton = QPushButton("Export detections…", self)
        self.exportDetectionsButton.setObjectName("exportDetectionsButton")
        self.persistCheck = QCheckBox("Keep in project GeoPackage", self)
        self.persistCheck.setObjectName("persistCheck")
        self.persistCheck.setToolTip("Store the answers and detections in "
                                     "<project>_rs_lvlm_<crs>.gpkg next to the saved project "
                                     "instead of scratch layers")
        self.persistCheck.setChecked(settings.keep_in_project())
        self.persistCheck.toggled.connect(settings.set_keep_in_project)
        self.persistCheck.toggled.connect(lambda on: on and self.keep_in_project())
        self.exportAnswersButton.clicked.connect(lambda: self.export("answers"))
        self.exportDetectionsButton.clicked.connect(lambda: self.export("detections"))
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.exportAnswersButton, 0, 0)
        layout.addWidget(self.exportDetectionsButton, 0, 1)
        layout.addWidget(self.persistCheck, 1, 0, 1, 2)

    def default_path(self, kind: str) -> str:
        """The file name the export dialog proposes: the raster's name and the time."""
        raster = self.dock.layerCombo.currentLayer()
        source = self.dock.asked_raster() or (raster.name() if raster is not None else "")
        return str(export.default_folder() / export.default_file_name(str(source), kind))

    def export(self, kind: str, path: Optional[str] = None) -> Optional[str]:
        """Export the answers or detections layer, asking for a file name (with a default)
        when none is given, and add the written file to the map."""
        name = KINDS[kind]
        layer = self.dock.last_layers.get(kind) or result_layers.find_layer(name)
        if layer is None:
            self.dock.show_message(f"There is no '{name}' layer to export yet.", Qgis.Warning)
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, f"Export {name}", self.default_path(kind),
                                                  export.FILE_FILTER)
            if not path:
                return None
        try:
            written = export.export_layer(layer, path)
        except export.ExportError as exc:
            self.dock.show_message(str(exc), Qgis.Warning)
            return None
        export.add_to_map(written, f"{name} ({Path(written).stem})", export.table_name(layer))
        self.dock.show_message(f"Exported '{name}' to {written} and added it to the map.")
        return written

    def keep_in_project(self) -> None:
        """With the option on, store the scratch result layers in GeoPackages next to the saved
        project, one per CRS holding both layers (later answers are appended to them)."""
        if not self.persistCheck.isChecked():
            return
        if export.project_geopackage() is None:
            self.dock.show_message("Save the project first to keep the results in its "
                                   "GeoPackage.", Qgis.Warning)
            return
        for answers in result_layers.find_layers(result_layers.ANSWERS_LAYER):
            if answers.providerType() != "memory":
                continue
            # both tables go into one new file at once (no later writes into an open file)
            group = {"answers": answers, "detections": result_layers.detections_layer(answers.crs())}
            ids = {kind: layer.id() for kind, layer in group.items()}
            try:
                stored = export.make_permanent(list(group.values()),
                                               export.project_geopackage(export.crs_tag(answers)))
            except export.ExportError as exc:
                self.dock.show_message(str(exc), Qgis.Warning)
                return
            for kind, old in group.items():
                new = stored.get(ids[kind])
                if new is None:
                    continue
                if kind == "answers":
                    result_layers.label_newest(new)  # the file's feature ids are new ones
                for held in (self.dock.last_layers, self.dock.results.layers):
                    if held.get(kind) is old:
                        held[kind] = new
