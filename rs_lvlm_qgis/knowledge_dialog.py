"""The knowledge base from QGIS: list and search the entries, add or edit the analyst's own,
rebuild the index in the background.

Shipped entries are shown read-only (greyed); the analyst's live in their profile
(:func:`settings.user_knowledge_file`) and are what "Rebuild index" hands to the engine's
``build-knowledge`` as ``--entries``.  The dock's retrieved entries open this dialog on the
entry they link to.
"""
from __future__ import annotations

from typing import List, Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import paths, settings
from .knowledge_store import KIND_LEVEL, Entry, EntryError, make_entry, read_entries, \
    shipped_entries_file, write_entries
from .knowledge_task import KnowledgeBuildParameters, KnowledgeBuildTask

COLUMNS = ("Level", "Name", "Definition", "From")


class KnowledgeDialog(QDialog):
    """Entries table with search, an entry form, save and rebuild."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("RsLvlmKnowledgeDialog")
        self.setWindowTitle("RS-LVLM: knowledge base")
        self.resize(820, 560)
        self.user_file = settings.user_knowledge_file()
        self.entries: List[Entry] = read_entries(shipped_entries_file(), shipped=True) + \
            read_entries(self.user_file)
        self.editing = ""  # id of the user entry in the form ("" = a new one)
        self.task: Optional[KnowledgeBuildTask] = None
        self._build()
        self.fill()

    def _build(self) -> None:
        self.searchEdit = QLineEdit(self)
        self.searchEdit.setObjectName("knowledgeSearch")
        self.searchEdit.setPlaceholderText("Search names, aliases and definitions")
        self.searchEdit.textChanged.connect(lambda _t: self.fill())
        self.table = QTableWidget(0, len(COLUMNS), self)
        self.table.setObjectName("knowledgeTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(2, QHeaderView.Stretch)
        for column in (0, 1, 3):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        self.table.currentCellChanged.connect(lambda row, *_: self._on_row(row))
        self.kindCombo = QComboBox(self)
        self.kindCombo.setObjectName("knowledgeKind")
        self.kindCombo.addItems(list(KIND_LEVEL))
        self.nameEdit = QLineEdit(self)
        self.nameEdit.setObjectName("knowledgeName")
        self.aliasesEdit = QLineEdit(self)
        self.aliasesEdit.setObjectName("knowledgeAliases")
        self.aliasesEdit.setPlaceholderText("other names, comma separated")
        self.definitionEdit = QPlainTextEdit(self)
        self.definitionEdit.setObjectName("knowledgeDefinition")
        self.definitionEdit.setMaximumHeight(80)
        self.newButton = QPushButton("New entry", self)
        self.newButton.setObjectName("knowledgeNewButton")
        self.newButton.clicked.connect(self.new_entry)
        self.saveButton = QPushButton("Save entry", self)
        self.saveButton.setObjectName("knowledgeSaveButton")
        self.saveButton.clicked.connect(self.save_entry)
        self.deleteButton = QPushButton("Delete", self)
        self.deleteButton.setObjectName("knowledgeDeleteButton")
        self.deleteButton.clicked.connect(self.delete_entry)
        self.rebuildButton = QPushButton("Rebuild index", self)
        self.rebuildButton.setObjectName("knowledgeRebuildButton")
        self.rebuildButton.clicked.connect(lambda: self.rebuild())
        self.statusLabel = QLabel(f"Your entries are kept in {self.user_file}.", self)
        self.statusLabel.setObjectName("knowledgeStatus")
        self.statusLabel.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Kind", self.kindCombo)
        form.addRow("Name", self.nameEdit)
        form.addRow("Aliases", self.aliasesEdit)
        form.addRow("Definition", self.definitionEdit)
        row = QHBoxLayout()
        for button in (self.newButton, self.saveButton, self.deleteButton):
            row.addWidget(button)
        row.addStretch(1)
        row.addWidget(self.rebuildButton)
        close = QDialogButtonBox(QDialogButtonBox.Close, self)
        close.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        for item in (self.searchEdit, self.table, form, row, self.statusLabel, close):
            (layout.addLayout if not isinstance(item, QWidget) else layout.addWidget)(item)
        self._set_form(None)

    # ------------------------------------------------------------------ table
    def visible_entries(self) -> List[Entry]:
        return [e for e in self.entries if e.matches(self.searchEdit.text())]

    def fill(self) -> None:
        """Show the entries matching the search, the analyst's own first."""
        rows = sorted(self.visible_entries(), key=lambda e: (e.shipped, e.level, e.name))
        self.table.blockSignals(True)
        self.table.setRowCount(len(rows))
        for r, entry in enumerate(rows):
            values = (entry.level, entry.name, entry.definition,
                      "shipped" if entry.shipped else "yours")
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setData(Qt.UserRole, entry.id)
                item.setToolTip(entry.definition)
                if entry.shipped:
                    item.setForeground(QColor("#666666"))
                self.table.setItem(r, c, item)
        self.table.blockSignals(False)

    def entry_at(self, row: int) -> Optional[Entry]:
        item = self.table.item(row, 0) if row >= 0 else None
        wanted = item.data(Qt.UserRole) if item is not None else None
        return next((e for e in self.entries if e.id == wanted), None)

    def show_entry(self, key: str) -> Optional[Entry]:
        """Select the entry with this id (or name), clearing the search so it is listed."""
        self.searchEdit.setText("")
        for row in range(self.table.rowCount()):
            entry = self.entry_at(row)
            if entry is not None and key in (entry.id, entry.name):
                self.table.selectRow(row)
                self.table.setCurrentCell(row, 1)
                self._on_row(row)
                return entry
        return None

    def _on_row(self, row: int) -> None:
        self._set_form(self.entry_at(row))

    # ------------------------------------------------------------------ form
    def _set_form(self, entry: Optional[Entry]) -> None:
        editable = entry is None or not entry.shipped
        self.editing = entry.id if entry is not None and not entry.shipped else ""
        self.kindCombo.setCurrentText(entry.kind if entry else "object_class")
        self.nameEdit.setText(entry.name if entry else "")
        self.aliasesEdit.setText(", ".join(entry.aliases) if entry else "")
        self.definitionEdit.setPlainText(entry.definition if entry else "")
        for widget in (self.kindCombo, self.nameEdit, self.aliasesEdit, self.saveButton):
            widget.setEnabled(editable)
        self.definitionEdit.setReadOnly(not editable)
        self.deleteButton.setEnabled(bool(self.editing))

    def new_entry(self) -> None:
        self.table.clearSelection()
        self._set_form(None)
        self.nameEdit.setFocus()

    def save_entry(self) -> Optional[Entry]:
        """Add the form as a new entry, or replace the edited one; saved to the user file."""
        try:
            entry = make_entry(self.kindCombo.currentText(), self.nameEdit.text(),
                               self.definitionEdit.toPlainText(), self.aliasesEdit.text(),
                               self.entries, self.editing)
        except EntryError as exc:
            self.statusLabel.setText(str(exc))
            return None
        self.entries = [e for e in self.entries if e.id != entry.id] + [entry]
        write_entries(self.user_file, self.entries)
        self.fill()
        self.show_entry(entry.id)
        self.statusLabel.setText(f"Saved '{entry.name}'. Rebuild the index to use it.")
        return entry

    def delete_entry(self) -> None:
        if not self.editing:
            return
        self.entries = [e for e in self.entries if e.id != self.editing]
        write_entries(self.user_file, self.entries)
        self.fill()
        self._set_form(None)
        self.statusLabel.setText("Deleted. Rebuild the index to drop it.")

    # ------------------------------------------------------------------ rebuild
    def rebuild(self, engine_python: Optional[str] = None) -> Optional[KnowledgeBuildTask]:
        """Rebuild the index from the shipped and the analyst's entries in a QgsTask."""
        python = engine_python or settings.resolve_engine_python()
        root = paths.engine_root()
        if not python or root is None:
            self.statusLabel.setText("The engine is not set up: use \"Set up the engine…\" in "
                                     "the RS-LVLM panel first.")
            return None
        write_entries(self.user_file, self.entries)
        self.task = KnowledgeBuildTask(KnowledgeBuildParameters(
            python, root, self.user_file, settings.user_knowledge_index()))
        self.task.taskCompleted.connect(self._rebuilt)
        self.task.taskTerminated.connect(self._rebuilt)
        self.rebuildButton.setEnabled(False)
        self.statusLabel.setText("Rebuilding the knowledge index…")
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def _rebuilt(self) -> None:
        task = self.task
        self.rebuildButton.setEnabled(True)
        if task is None:
            return
        if task.error:
            self.statusLabel.setText("Rebuild failed: " + task.error)
            return
        client = getattr(self.parent(), "client", None)
        if client is not None and hasattr(client, "restart_when_idle"):
            client.restart_when_idle()          # the engine reads the new index at its next start
        self.statusLabel.setText(f"Index rebuilt: {task.result.get('count')} entries in "
                                 f"{task.result.get('out')}; the next question retrieves from it.")
