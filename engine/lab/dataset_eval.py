"""Frozen evaluation on published RS benchmarks: ``python -m engine evaluate --model DIR
--dataset FORMAT:PATH [--split test] [--n N] --json``.

Why frozen: published RS-LVLM numbers are hard to compare because every paper writes its own
prompt, answer matching and IoU code (GeoChat ships none, its issue #32).  Here the prompts are
fixed per backend (:data:`PROMPTS`, written out in docs/evaluation.md), decoding is greedy, items
run in a fixed order, and the result carries everything needed to reproduce or audit a figure:
the exact prompt as the model saw it, the model, a checksum of every file read, the counts, the
conventions used and every failed item.  Any pipeline behind :mod:`engine.backends` works (the
embedded RS-LVLM, LLaVA / GeoChat folders); the data sets are read by
:mod:`engine.data.benchmark_formats`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from engine.data.benchmark_formats import Benchmark, BenchItem, class_key, read_benchmark
from engine.grounding import GridBox, parse_boxes

from .metrics import box_iou, box_polygon, caption_scores, match_boxes, normalize_answer

log = logging.getLogger("engine.lab.dataset_eval")

__all__ = ["PROMPTS", "MAX_NEW_TOKENS", "dataset_checksum", "select_items", "request_for",
           "rendered_prompt", "evaluate_dataset", "evaluate_pipeline", "main"]

BATCH = 8
PROMPTS: dict[str, dict[str, tuple[str, str]]] = {
    "rs_lvlm": {
        "classify": ("classify", "Classify the image within one of the given classes: {classes}."),
        "vqa": ("vqa", "{text}"),
        "ref": ("ground", "[refer] Give the location of {text}."),
        "grounding": ("ground", "[grounding] {text}"),
        "caption": ("caption", "Give a short caption for this image."),
    },
    "llava": {   # the backend adds GeoChat's answer suffixes (engine.backends.llava.build_instruction)
        "classify": ("classify", "Classify the image within one of the given classes: {classes}."),
        "vqa": ("vqa", "{text}"),
        "ref": ("refer", "Give me the location of <p> {text} </p>"),
        "grounding": ("ground", "[grounding] {text}"),
        "caption": ("caption", "Give a short caption for this image."),
    },
}
"""Backend family -> prompt kind -> (pipeline task, question template).  ``{classes}`` is the
data set's class list joined by ", "; ``{text}`` the item's question or referring expression."""
MAX_NEW_TOKENS = {"classify": 24, "vqa": 24, "ground": 96, "caption": 96}
COUNT_AREA_TYPES = ("count", "counting", "area")


def _family(pipeline: Any) -> str:
    return "llava" if getattr(pipeline, "backend", "rs_lvlm") in ("llava", "vllm") else "rs_lvlm"


def _kind(item: BenchItem) -> str:
    return item.qtype if item.task == "ground" else item.task


def request_for(family: str, item: BenchItem, classes: Sequence[str]) -> tuple[str, str]:
    """(pipeline task, question) of an item under a backend family's fixed prompt."""
    task, template = PROMPTS[family][_kind(item)]
    return task, template.format(classes=", ".join(classes), text=item.text)


def rendered_prompt(pipeline: Any, task: str, question: str) -> str:
    """The prompt text exactly as the backend builds it (image placeholder included)."""
    if _family(pipeline) == "llava":
        from engine.backends.llava import build_instruction, vicuna_v1_prompt

        return vicuna_v1_prompt(build_instruction(task, question)[0])
    from engine.model.prompts import build_prompt

    return build_prompt(task, question)


def dataset_checksum(root: Path, files: Sequence[Path]) -> str:
    """sha256 over the files read, sorted by path: each contributes its path relative to the data
    set root and its own sha256, so a changed, added, removed or renamed file changes it."""
    outer = hashlib.sha256()
    for rel, path in sorted((_relative(root, p), p) for p in set(map(Path, files))):
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(rel.encode("utf-8") + b"\0" + inner.digest())
    return outer.hexdigest()


def _relative(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def select_items(items: Sequence[BenchItem], n: int | None) -> list[BenchItem]:
    """All items, or ``n`` of them evenly spread over the data set's order (item ``floor(i *
    total / n)``), so a small run still sees every class folder and every question type."""
    total = len(items)
    if n is None or n >= total:
        return list(items)
    if n <= 0:
        raise ValueError("--n must be positive")
    return [items[i * total // n] for i in range(n)]


# -- running the model ------------------------------------------------------------------------
def _predict(pipeline: Any, bench: Benchmark, items: list[BenchItem], max_new_tokens: int | None,
             batch: int, progress: bool) -> tuple[list[str], dict[str, dict]]:
    """Raw answers in item order; items sharing a question run as batches in first-seen order."""
    from tqdm import tqdm

    from engine.data.real_datasets import load_image

    family = _family(pipeline)
    requests = [request_for(family, it, bench.classes) for it in items]
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, req in enumerate(requests):
        groups[req].append(i)
    texts = [""] * len(items)
    prompts: dict[str, dict] = {}
    bar = tqdm(total=len(items), desc="evaluate", file=sys.stderr, disable=not progress, mininterval=5)
    for (task, question), indices in groups.items():
        limit = max_new_tokens or MAX_NEW_TOKENS[items[indices[0]].task]
        kind = _kind(items[indices[0]])
        prompts.setdefault(kind, {"task": task, "template": PROMPTS[family][kind][1], "max_new_tokens": limit,
                                  "example_rendered": rendered_prompt(pipeline, task, question)})
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            images = [load_image(items[i].image, pipeline.image_size)[0] for i in chunk]
            answers = pipeline.answer(images, task, question, max_new_tokens=limit, do_sample=False)
            for i, answer in zip(chunk, answers):
                texts[i] = answer.text
            bar.update(len(chunk))
    bar.close()
    return texts, prompts


# -- scoring ----------------------------------------------------------------------------------
def _failure(item: BenchItem, prediction: str, reason: str, **extra: Any) -> dict:
    out = {"key": item.key, "question": item.text, "reference": item.references[0] if item.references else "",
           "prediction": prediction, "reason": reason}
    out.update(extra)
    return out


def score_classification(items: list[BenchItem], preds: list[str], classes: Sequence[str] = ()) -> tuple[dict, list]:
    """Accuracy: the answer equals the item's class ignoring case, spaces and punctuation (GeoChat's
    matching); per-class accuracy; answers naming no class of the list are counted apart."""
    keys = {class_key(c) for c in classes}
    hits: dict[str, list[int]] = defaultdict(list)
    failures, outside = [], 0
    for it, p in zip(items, preds):
        ok = class_key(p) == class_key(it.references[0])
        hits[it.references[0]].append(int(ok))
        if not ok:
            named = class_key(p) in keys
            outside += int(not named)
            failures.append(_failure(it, p, "other class" if named else "not a class of the list"))
    n = len(items)
    return {"accuracy": sum(sum(v) for v in hits.values()) / n if n else 0.0,
            "per_class": {c: sum(v) / len(v) for c, v in sorted(hits.items())},
            "n_per_class": {c: len(v) for c, v in sorted(hits.items())},
            "answers_outside_class_list": outside}, failures


def score_vqa(items: list[BenchItem], preds: list[str], classes: Sequence[str] = ()) -> tuple[dict, list]:
    """Accuracy per question type, and overall both over every type and without count / area
    (published RSVQA numbers differ on this), each as OA (per question) and AA (mean of types)."""
    hits: dict[str, list[int]] = defaultdict(list)
    failures = []
    for it, p in zip(items, preds):
        ok = normalize_answer(p) == normalize_answer(it.references[0])
        hits[it.qtype].append(int(ok))
        if not ok:
            failures.append(_failure(it, p, "wrong answer", qtype=it.qtype))
    per_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}

    def overall(types: list[str]) -> dict:
        answered = [h for t in types for h in hits[t]]
        return {"types": types, "n": len(answered),
                "oa": sum(answered) / len(answered) if answered else 0.0,
                "aa": sum(per_type[t] for t in types) / len(types) if types else 0.0}

    every = sorted(hits)
    return {"per_type": per_type, "n_per_type": {t: len(v) for t, v in sorted(hits.items())},
            "overall_all_types": overall(every),
            "overall_without_count_area": overall([t for t in every if t not in COUNT_AREA_TYPES])}, failures


def _inter_union(a: GridBox, b: GridBox) -> tuple[float, float]:
    """Intersection and union areas of two (possibly rotated) boxes, for cumulative IoU."""
    if a.angle == b.angle == 0:
        inter = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1)) * max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
        return inter, (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    pa, pb = box_polygon(a), box_polygon(b)
    inter = float(pa.intersection(pb).area)
    return inter, float(pa.area + pb.area - inter)


def _box_area(b: GridBox) -> float:
    return (b.x2 - b.x1) * (b.y2 - b.y1)


def score_grounding(items: list[BenchItem], preds: list[str], classes: Sequence[str] = ()) -> tuple[dict, list]:
    """Acc@0.5 ... Acc@0.9 and mean IoU over reference boxes, cumulative IoU over referring items;
    a parse failure (no box in the answer) is a miss (IoU 0) and is also counted apart.
    Referring items compare the answer's first box (extra boxes are never rewarded); items with
    several reference boxes match greedily 1:1."""
    ious: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    areas = [0.0, 0.0]                       # referring items: sum of intersections, of unions
    failures, parse_failures, unusable = [], 0, 0
    for it, p in zip(items, preds):
        if not it.boxes:          # a reference that could not be read: reported, never scored
            unusable += 1
            failures.append(_failure(it, p, "reference has no readable box"))
            continue
        boxes = parse_boxes(p)
        single = len(it.boxes) == 1
        if not boxes:
            parse_failures += 1
            got = [0.0] * len(it.boxes)
            inter, union = 0.0, _box_area(it.boxes[0])
            failures.append(_failure(it, p, "no box parsed", iou=0.0))
        else:
            got = [box_iou(boxes[0], it.boxes[0])] if single else match_boxes(boxes, it.boxes)
            inter, union = _inter_union(boxes[0], it.boxes[0])
            if min(got, default=1.0) < 0.5:
                failures.append(_failure(it, p, "IoU below 0.5", iou=round(min(got), 6)))
        if single:
            areas[0], areas[1] = areas[0] + inter, areas[1] + union
        ious.extend(got)
        by_type[it.qtype].extend(got)

    def summary(values: list[float]) -> dict:
        n = len(values)
        out = {f"acc@{t}": sum(v >= t for v in values) / n if n else 0.0 for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
        out.update({"mean_iou": sum(values) / n if n else 0.0, "n_boxes": n})
        return out

    out = summary(ious)
    out.update({"cum_iou_referring": areas[0] / areas[1] if areas[1] else 0.0, "parse_failures": parse_failures,
                "items_without_reference_box": unusable,
                "per_type": {t: summary(v) for t, v in sorted(by_type.items())}})
    return out, failures


def score_captions(items: list[BenchItem], preds: list[str], classes: Sequence[str] = ()) -> tuple[dict, list]:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap) over every evaluated image; empty answers listed."""
    scores = caption_scores(preds, [it.references for it in items])
    failures = [_failure(it, p, "empty caption") for it, p in zip(items, preds) if not p.strip()]
    return scores, failures


SCORERS = {"classify": score_classification, "vqa": score_vqa, "ground": score_grounding, "caption": score_captions}


# -- the whole run ----------------------------------------------------------------------------
def evaluate_pipeline(pipeline: Any, bench: Benchmark, n: int | None = None, max_new_tokens: int | None = None,
                      batch: int = BATCH, progress: bool = False, model_dir: Path | None = None) -> dict:
    """Score a loaded pipeline on a benchmark; the result is a JSON-ready dict, identical between
    runs on the same model and files except for its ``timing`` section."""
    t0 = time.perf_counter()
    missing = [it.key for it in bench.items if not it.image.is_file()]
    items = select_items([it for it in bench.items if it.image.is_file()], n)
    if not items:
        raise ValueError(f"{bench.root}: no items to evaluate")
    preds, prompts = _predict(pipeline, bench, items, max_new_tokens, batch, progress)
    t_predict = time.perf_counter() - t0
    task = items[0].task
    metrics, failures = SCORERS[task](items, preds, bench.classes)
    files = list(bench.annotation_files) + [it.image for it in items]
    path = model_dir if model_dir is not None else getattr(pipeline, "model_dir", None)
    return {
        "dataset": {"format": bench.format, "path": str(bench.root), "sha256": dataset_checksum(bench.root, files),
                    "files_read": len(set(files)), "items_total": len(bench.items), "items_evaluated": len(items),
                    "selection": "all" if len(items) + len(missing) == len(bench.items) else f"{len(items)} evenly spread",
                    "classes": list(bench.classes), "conventions": dict(bench.conventions)},
        "model": {"name": getattr(pipeline, "name", None), "path": str(path) if path else None,
                  "backend": getattr(pipeline, "backend", "rs_lvlm"), "image_size": pipeline.image_size},
        "decoding": {"greedy": True, "batch": batch, "order": "dataset order, grouped by identical prompt",
                     "answer_grammar": getattr(pipeline, "grammar", None)},
        "prompts": prompts,
        "task": task,
        "counts": {"items": len(items), "failures": len(failures), "missing_images": len(missing)},
        "missing_images": missing,
        "metrics": metrics,
        "failures": failures,
        "timing": {"predict_s": round(t_predict, 3), "total_s": round(time.perf_counter() - t0, 3)},
    }


def evaluate_dataset(model_dir: Path, spec: str, split: str | None = "test", n: int | None = None,
                     device: str = "auto", max_new_tokens: int | None = None, batch: int = BATCH,
                     plus_one: bool = False, progress: bool = True) -> dict:
    """Load the model folder (either backend) and score it on ``FORMAT:PATH``."""
    from engine.backends import load_pipeline
    from engine.device import resolve_device

    bench = read_benchmark(spec, split, plus_one=plus_one)
    pipeline = load_pipeline(model_dir, resolve_device(device))
    result = evaluate_pipeline(pipeline, bench, n=n, max_new_tokens=max_new_tokens, batch=batch,
                               progress=progress, model_dir=Path(model_dir))
    result["dataset"]["split"] = split
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine evaluate --dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--dataset", required=True, help="FORMAT:PATH, FORMAT one of ucm, aid, nwpu, scenes, "
                                                         "rsvqa, dior-rsvg, geochat-bench, captions")
    parser.add_argument("--split", default="test", help="split name (RSVQA, DIOR-RSVG, captions; default test)")
    parser.add_argument("--n", type=int, default=None, help="evaluate N items spread evenly over the data set")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--voc-plus-one", action="store_true",
                        help="DIOR-RSVG: read bndbox as 1-based inclusive pixel indices (width xmax-xmin+1)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    from engine.paths import DEFAULT_MODEL_DIR
    from engine.service import require_model_dir

    model_dir = args.model or DEFAULT_MODEL_DIR
    require_model_dir(model_dir)
    try:
        result = evaluate_dataset(model_dir, args.dataset, args.split, args.n, args.device, args.max_new_tokens,
                                  args.batch, args.voc_plus_one)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
