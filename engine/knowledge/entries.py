"""Knowledge entries: what one piece of RS semantics is, how entry files are read and checked.

Entries are short written definitions of scene classes, object classes, land-cover types and
attributes (``resources/knowledge/entries.jsonl``, user-extendable).  Every complaint about a
file names the file and line, because users write these files by hand.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.errors import BAD_CHECKPOINT, EngineError
from engine.paths import KNOWLEDGE_DIR
from engine.tasks import LEVELS

__all__ = ["LEVELS", "KINDS", "SOURCES", "KIND_LEVELS", "DEFAULT_ENTRIES", "KnowledgeEntry", "entry_from_obj",
           "load_entries", "canonical_jsonl", "entries_hash"]

KINDS: tuple[str, ...] = ("scene_class", "object_class", "land_cover", "attribute")
SOURCES: tuple[str, ...] = ("UCM", "AID", "NWPU-RESISC45", "DIOR", "DOTA", "LoveDA", "synthetic", "general")
# Which levels each kind may live on: attributes are object level except density/layout (region).
KIND_LEVELS: dict[str, tuple[str, ...]] = {
    "scene_class": ("scene",), "object_class": ("object",), "land_cover": ("region",),
    "attribute": ("object", "region"),
}
DEFAULT_ENTRIES = KNOWLEDGE_DIR / "entries.jsonl"

_ID_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_FIELDS = ("id", "level", "kind", "name", "definition", "aliases", "sources")


@dataclass(frozen=True)
class KnowledgeEntry:
    """One piece of RS semantics: what a class or attribute looks like from above."""

    id: str
    level: str
    kind: str
    name: str
    definition: str
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The text that gets embedded; the name leads so short queries match it strongly."""
        return f"{self.name}: {self.definition}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"], d["sources"] = list(self.aliases), list(self.sources)
        return d


def entry_from_obj(obj: Any, where: str) -> KnowledgeEntry:
    """Validate one decoded JSON line; every complaint names the file and line (``where``)."""
    if not isinstance(obj, dict):
        raise EngineError(BAD_CHECKPOINT, f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _FIELDS if k not in obj]
    unknown = sorted(set(obj) - set(_FIELDS))
    if missing or unknown:
        problem = "; ".join(p for p in (missing and f"missing keys {missing}",
                                        unknown and f"unknown keys {unknown}") if p)
        raise EngineError(BAD_CHECKPOINT, f"{where}: {problem}; expected exactly {list(_FIELDS)}")
    for key in ("id", "level", "kind", "name", "definition"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise EngineError(BAD_CHECKPOINT, f"{where}: '{key}' must be a non-empty string")
    for key in ("aliases", "sources"):
        if not isinstance(obj[key], list) or not all(isinstance(a, str) and a.strip() for a in obj[key]):
            raise EngineError(BAD_CHECKPOINT, f"{where}: '{key}' must be a list of non-empty strings")
    if not _ID_RE.match(obj["id"]):
        raise EngineError(BAD_CHECKPOINT, f"{where}: id {obj['id']!r} must be lower-case snake_case "
                                          "parts joined by dots, e.g. 'scene.airport'")
    if obj["kind"] not in KINDS:
        raise EngineError(BAD_CHECKPOINT, f"{where}: kind {obj['kind']!r} is not one of {list(KINDS)}")
    if obj["level"] not in KIND_LEVELS[obj["kind"]]:
        raise EngineError(BAD_CHECKPOINT, f"{where}: level {obj['level']!r} is not allowed for kind "
                                          f"{obj['kind']!r} (allowed: {list(KIND_LEVELS[obj['kind']])})")
    if obj["name"] != obj["name"].strip().lower():
        raise EngineError(BAD_CHECKPOINT, f"{where}: name {obj['name']!r} must be lower-case and trimmed")
    bad = [s for s in obj["sources"] if s not in SOURCES]
    if bad:
        raise EngineError(BAD_CHECKPOINT, f"{where}: unknown sources {bad}; allowed: {list(SOURCES)}")
    return KnowledgeEntry(obj["id"], obj["level"], obj["kind"], obj["name"], obj["definition"].strip(),
                          tuple(obj["aliases"]), tuple(obj["sources"]))


def load_entries(paths: Sequence[Path]) -> list[KnowledgeEntry]:
    """Read and merge JSON-lines entry files in order (later files add entries).

    Blank lines are skipped.  A duplicate id is refused rather than overriding silently, so a
    user file cannot change the meaning of a shipped entry by accident.
    """
    entries: list[KnowledgeEntry] = []
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise EngineError(BAD_CHECKPOINT, f"knowledge entries file not found: {path}")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EngineError(BAD_CHECKPOINT, f"{where}: invalid JSON ({exc.msg})") from None
                entry = entry_from_obj(obj, where)
                if entry.id in seen:
                    raise EngineError(BAD_CHECKPOINT, f"{where}: duplicate id {entry.id!r} "
                                                      f"(first defined at {seen[entry.id]})")
                seen[entry.id] = where
                entries.append(entry)
    if not entries:
        raise EngineError(BAD_CHECKPOINT, f"no knowledge entries in {[str(p) for p in paths]}")
    return entries


def canonical_jsonl(entries: Sequence[KnowledgeEntry]) -> str:
    return "".join(json.dumps(e.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)


def entries_hash(entries: Sequence[KnowledgeEntry]) -> str:
    """sha256 of the canonical merged entries: insensitive to formatting, sensitive to content."""
    return hashlib.sha256(canonical_jsonl(entries).encode("utf-8")).hexdigest()


