"""``python -m engine build-knowledge``: embed the entries into a faiss index, atomically.

The same code serves the shipped index, a user's extra entries and the plugin's knowledge
dialog (which runs this command in a background task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from engine.errors import EngineError

from .encoder import EMBED_DIM, SentenceEncoder
from .entries import DEFAULT_ENTRIES, KINDS, LEVELS, canonical_jsonl, entries_hash, load_entries
from .index import DEFAULT_INDEX_DIR, FORMAT_VERSION

__all__ = ["build_index", "main"]


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
    _write_atomic(out_dir / "entries.jsonl", lambda p: p.write_text(canonical_jsonl(entries), encoding="utf-8"))
    _write_atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out_dir


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    return buf.getvalue()


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
