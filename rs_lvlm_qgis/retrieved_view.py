"""The list of knowledge entries the model retrieved for an answer, linked to their
definitions.

Why show them: the Semantic Augmentation Module answers with these entries in mind, so an
analyst who doubts an answer can see which semantics it leaned on, read their definitions (the
tooltip) and open the entry in the knowledge base (double-click) to correct or extend it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget


class RetrievedList(QTreeWidget):
    """Level, entry and score of each retrieved entry; ``entryOpened`` carries its id."""

    entryOpened = pyqtSignal(str)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("retrievedList")
        self.setHeaderLabels(["Level", "Knowledge entry", "Score"])
        self.setRootIsDecorated(False)
        self.setMaximumHeight(140)
        self.setToolTip("Double-click an entry to open it in the knowledge base")
        header = self.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.itemDoubleClicked.connect(
            lambda item, _col: self.entryOpened.emit(str(item.data(1, Qt.UserRole) or "")))

    def show_result(self, result: Dict[str, Any]) -> None:
        """Replace the list by the entries of ``result["retrieved"]``."""
        self.clear()
        for entry in result.get("retrieved") or []:
            if isinstance(entry, dict):
                score = entry.get("score")
                item = QTreeWidgetItem([str(entry.get("level") or ""), str(entry.get("entry") or ""),
                                        f"{score:.2f}" if isinstance(score, (int, float)) else ""])
                item.setToolTip(1, str(entry.get("definition") or entry.get("entry") or ""))
                item.setData(1, Qt.UserRole, str(entry.get("id") or entry.get("entry") or ""))
                self.addTopLevelItem(item)
