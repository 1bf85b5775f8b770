"""A built knowledge index, loaded: entries, embeddings and faiss search per level.

The Semantic Augmentation Module enriches each visual level (object / region / scene) with
semantics retrieved from this index; it ships next to the model, so inference only encodes the
question, never the entries.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from engine.errors import BAD_CHECKPOINT, EngineError
from engine.paths import KNOWLEDGE_DIR

from .encoder import EMBED_DIM, ENCODER_NAME, SentenceEncoder
from .entries import DEFAULT_ENTRIES, LEVELS, KnowledgeEntry, entries_hash, entry_from_obj, load_entries

__all__ = ["KnowledgeBase", "DEFAULT_INDEX_DIR", "INDEX_FILES", "FORMAT_VERSION"]

FORMAT_VERSION = 1
INDEX_FILES = ("index.faiss", "embeddings.npy", "entries.jsonl", "meta.json")
DEFAULT_INDEX_DIR = KNOWLEDGE_DIR / "index"


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
            entries = [entry_from_obj(json.loads(line), f"{index_dir / 'entries.jsonl'}:{n}")
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
