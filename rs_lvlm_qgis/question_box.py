"""The question field: an editable combo box that keeps the analyst's earlier questions.

Why a combo box: analysts ask the same few questions of many regions ("how many ships are
there?"); the history (kept in the settings, most recent first) makes that one click, and
Enter in the field asks, as in any search box.
"""
from __future__ import annotations

from typing import Optional

from qgis.PyQt.QtWidgets import QComboBox, QWidget

from . import settings


class QuestionBox(QComboBox):
    """``questionEdit``: editable, filled from and remembering to the question history."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("questionEdit")
        self.setEditable(True)
        self.setInsertPolicy(QComboBox.NoInsert)
        self.addItems(settings.question_history())
        self.setCurrentText("")

    def question(self) -> str:
        return self.currentText().strip()

    def remember(self, question: str) -> None:
        """Put ``question`` at the top of the history, keeping it in the field."""
        if not question:
            return
        history = settings.remember_question(question)
        self.blockSignals(True)
        self.clear()
        self.addItems(history)
        self.setCurrentText(question)
        self.blockSignals(False)
