"""``python -m engine export-checkpoint SRC DST [--dtype float16]``: a compact copy of a checkpoint.

Used to ship the embedded model: the trained run is stored in float16 (half the bytes in git
history) and loaded back as float32 on CPU; `python -m engine evaluate` on the copy measures
what the analyst actually gets.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine export-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--name", help="the model's display name (config.json 'name')")
    args = parser.parse_args(argv)
    from engine.model.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(args.src)
    if args.name:
        loaded.model.config.name = args.name
    if args.dst.exists():
        shutil.rmtree(args.dst)
    save_checkpoint(loaded.model, loaded.tokenizer, args.dst, knowledge_index_dir=loaded.knowledge_dir,
                    weights_dtype=getattr(torch, args.dtype))
    for extra in ("train_summary.json", "loss_log.jsonl"):
        if (args.src / extra).is_file():
            shutil.copy(args.src / extra, args.dst / extra)
    size = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(f"{args.dst}: {size / 2**20:.1f} MiB ({args.dtype} weights)")
    return 0
