"""Synthetic scenes written out in the published benchmark formats:
``python -m engine.lab.synthetic_benchmarks --out DIR [--seed S] [--n N]``.

Why: the frozen evaluator (:mod:`engine.lab.dataset_eval`) reads UC Merced-style folders, RSVQA
JSON, DIOR-RSVG XML, GeoChat-Bench JSONL and caption JSON; none of those can be downloaded where
this project is built.  Writing the evaluation stream's synthetic samples
(:func:`engine.data.instructions.iter_samples`, answers correct by construction) into the same
layouts lets anyone run every reader, prompt and metric end to end, and gives the embedded model
figures in each format to compare with its synthetic ``--seed`` scores.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from engine.tasks import split_task_token

__all__ = ["write_synthetic_benchmarks", "referring_expression", "main"]

_REFER = re.compile(r"^(?:where is|where are|give the location of|locate)\s+(.+?)[.?]?$", re.IGNORECASE)


def referring_expression(question: str) -> str:
    """'[refer] Where is the red airplane?' -> 'the red airplane' (the phrase a data set stores)."""
    _, text = split_task_token(question)
    match = _REFER.match(text.strip())
    return (match.group(1) if match else text).strip(" .?")


def _save(image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path.name


def _voc(path: Path, filename: str, size: int, name: str, box, desc: str) -> None:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = filename
    sz = ET.SubElement(ann, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, key).text = str(value)
    obj = ET.SubElement(ann, "object")
    ET.SubElement(obj, "name").text = name
    bb = ET.SubElement(obj, "bndbox")
    for key, grid in zip(("xmin", "ymin", "xmax", "ymax"), (box.x1, box.y1, box.x2, box.y2)):
        ET.SubElement(bb, key).text = f"{grid * size / 100:g}"   # exact: grid boxes are not whole pixels
    ET.SubElement(obj, "description").text = desc
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(ann).write(path)


def write_synthetic_benchmarks(out: Path, seed: int = 2000, n: int = 80, image_size: int = 128) -> dict[str, str]:
    """Write ``n`` evaluation samples (a quarter per task) into every format under ``out``;
    returns ``FORMAT -> FORMAT:PATH`` specs for ``--dataset``."""
    from engine.data.instructions import iter_samples

    out = Path(out)
    questions, answers, bench, captions = [], [], [], []
    ref_index = 0
    for k, s in enumerate(iter_samples(seed, n, image_size=image_size)):
        name = f"{k:05d}.png"
        if s.task == "classify":
            _save(s.image, out / "scenes" / s.answer.replace(" ", "_") / name)
        elif s.task == "vqa":
            _save(s.image, out / "rsvqa" / "Images_LR" / name)
            questions.append({"id": k, "img_id": f"{k:05d}", "type": s.qtype, "question": s.question,
                              "answers_ids": [k], "active": True})
            answers.append({"id": k, "question_id": k, "answer": s.answer, "active": True})
        elif s.task == "caption":
            _save(s.image, out / "captions" / "imgs" / name)
            captions.append({"filename": name, "imgid": k, "split": "test",
                             "sentences": [{"raw": r} for r in (s.references or [s.answer])]})
        else:
            ref = s.qtype == "ground_ref"
            text = referring_expression(s.question) if ref else split_task_token(s.question)[1]
            _save(s.image, out / "geochat-bench" / "images" / name)
            bench.append({"question_id": k, "image_id": f"{k:05d}", "question": text, "ground_truth": s.answer,
                          "type": "ref" if ref else "grounding"})
            if ref and len(s.boxes) == 1:
                _save(s.image, out / "dior-rsvg" / "JPEGImages" / name)
                _voc(out / "dior-rsvg" / "Annotations" / f"{k:05d}.xml", name, image_size, s.boxes[0].label,
                     s.boxes[0], text)
                ref_index += 1
    (out / "rsvqa" / "SYN_split_test_questions.json").write_text(json.dumps({"questions": questions}))
    (out / "rsvqa" / "SYN_split_test_answers.json").write_text(json.dumps({"answers": answers}))
    (out / "geochat-bench" / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in bench) + "\n")
    (out / "captions" / "dataset.json").write_text(json.dumps({"images": captions}))
    specs = {"scenes": f"scenes:{out / 'scenes'}", "rsvqa": f"rsvqa:{out / 'rsvqa'}",
             "geochat-bench": f"geochat-bench:{out / 'geochat-bench'}", "captions": f"captions:{out / 'captions'}"}
    if ref_index:
        (out / "dior-rsvg" / "test.txt").write_text("\n".join(map(str, range(ref_index))) + "\n")
        specs["dior-rsvg"] = f"dior-rsvg:{out / 'dior-rsvg'}"
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.lab.synthetic_benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--n", type=int, default=80, help="samples in all (a quarter per task)")
    args = parser.parse_args(argv)
    for spec in write_synthetic_benchmarks(args.out, args.seed, args.n).values():
        print(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
