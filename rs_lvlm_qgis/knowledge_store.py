"""The knowledge entries as the plugin edits them: the shipped ones (read-only) and the
analyst's own (a JSON-lines file in the QGIS profile).

Why two files: the engine's ``build-knowledge`` always includes the shipped entries and adds
``--entries FILE`` on top, refusing duplicate ids, so the analyst's file only ever *adds*
meaning and a plugin update can replace the shipped file without losing anyone's work.  The
rules here are the few the dialog can check as the analyst types (a name, a definition, a
unique id); the engine validates everything again when it builds the index.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from . import paths

LEVELS = ("object", "region", "scene")
# kind -> the level its entries live on (attributes may also be region level in the engine).
KIND_LEVEL = {"object_class": "object", "attribute": "object", "land_cover": "region",
              "scene_class": "scene"}
USER_SOURCE = "general"


@dataclass
class Entry:
    """One knowledge entry, with the fields of ``entries.jsonl``."""

    id: str
    level: str
    kind: str
    name: str
    definition: str
    aliases: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=lambda: [USER_SOURCE])
    shipped: bool = False

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "level": self.level, "kind": self.kind,
                           "name": self.name, "definition": self.definition,
                           "aliases": self.aliases, "sources": self.sources}, ensure_ascii=False)

    def matches(self, text: str) -> bool:
        """Case-insensitive search over name, aliases, definition and id."""
        text = text.strip().lower()
        return not text or any(text in part.lower() for part in
                               [self.name, self.definition, self.id] + self.aliases)


class EntryError(ValueError):
    """An entry the dialog refuses; the message says what to fix."""


def shipped_entries_file() -> Optional[Path]:
    """The plugin's own ``resources/knowledge/entries.jsonl``."""
    res = paths.resources_dir()
    path = res / "knowledge" / "entries.jsonl" if res is not None else None
    return path if path is not None and path.is_file() else None


def read_entries(path: Optional[Path], shipped: bool = False) -> List[Entry]:
    """The entries of a JSON-lines file (a missing file has none; unreadable lines are
    skipped here and reported by the engine when it builds)."""
    if path is None or not Path(path).is_file():
        return []
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("id"):
            entries.append(Entry(str(obj["id"]), str(obj.get("level") or ""),
                                 str(obj.get("kind") or ""), str(obj.get("name") or ""),
                                 str(obj.get("definition") or ""),
                                 [str(a) for a in obj.get("aliases") or []],
                                 [str(s) for s in obj.get("sources") or [USER_SOURCE]], shipped))
    return entries


def write_entries(path: Path, entries: Iterable[Entry]) -> None:
    """Write the analyst's entries atomically (a crash keeps the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(e.to_json() + "\n" for e in entries if not e.shipped),
                   encoding="utf-8")
    os.replace(tmp, path)


def entry_id(kind: str, name: str) -> str:
    """``user.object.fish_farm`` for an object class named "Fish farm": the ``user.`` prefix
    keeps the analyst's ids apart from the shipped ones."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return f"user.{KIND_LEVEL.get(kind, 'object')}.{slug}"


def make_entry(kind: str, name: str, definition: str, aliases: str,
               existing: Iterable[Entry], replacing: str = "") -> Entry:
    """A new or edited entry from the dialog's fields (raises :class:`EntryError`)."""
    name = " ".join(name.split()).lower()
    definition = " ".join(definition.split())
    if kind not in KIND_LEVEL:
        raise EntryError(f"Choose a kind ({', '.join(KIND_LEVEL)}).")
    if not name or not re.search(r"[a-z0-9]", name):
        raise EntryError("Give the entry a name.")
    if len(definition) < 10:
        raise EntryError("Write a definition: what it looks like from above.")
    new_id = replacing or entry_id(kind, name)
    for entry in existing:
        if entry.id == new_id and entry.id != replacing:
            raise EntryError(f"An entry '{entry.name}' with id {new_id} exists already.")
    alias_list = [a.strip() for a in aliases.split(",") if a.strip()]
    return Entry(new_id, KIND_LEVEL[kind], kind, name, definition, alias_list)
