"""The RS semantic knowledge base: entries, the sentence encoder, the faiss index and its build.

``from engine.knowledge import KnowledgeBase, SentenceEncoder`` is the stable way in; the
modules are ``entries`` (schema and files), ``encoder`` (MiniLM), ``index`` (loaded search)
and ``build`` (``python -m engine build-knowledge``).
"""
from __future__ import annotations

from .build import build_index, main
from .encoder import EMBED_DIM, ENCODER_NAME, SentenceEncoder
from .entries import DEFAULT_ENTRIES, KINDS, LEVELS, KnowledgeEntry, entries_hash, load_entries
from .index import DEFAULT_INDEX_DIR, INDEX_FILES, KnowledgeBase

__all__ = ["KnowledgeBase", "SentenceEncoder", "KnowledgeEntry", "build_index", "load_entries", "entries_hash",
           "main", "LEVELS", "KINDS", "EMBED_DIM", "ENCODER_NAME", "DEFAULT_ENTRIES", "DEFAULT_INDEX_DIR",
           "INDEX_FILES"]
