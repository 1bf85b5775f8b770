"""Published remote-sensing benchmarks read as evaluation item lists (no pixels loaded).

Why a second reader next to :mod:`engine.data.real_datasets`: those loaders feed *training*
(every image decoded, scene folders mapped onto this project's ten classes, boxes rounded onto the
integer grid the model writes).  A frozen evaluator needs the opposite: the data set's *own* class
names, reference boxes kept exact, the list of every file read (for the checksum) and images
decoded only for the items actually evaluated.  Each reader returns a :class:`Benchmark`; the
evaluator (:mod:`engine.lab.dataset_eval`) loads each item's image with
:func:`engine.data.real_datasets.load_image` when its batch runs.

Formats (``FORMAT:PATH`` on the command line):

* ``ucm`` / ``aid`` / ``nwpu``: ``root/<class>/<image>``; the class list is the data set's
  published one (:data:`PUBLISHED_CLASSES`), folders matched to it ignoring case and separators.
  ``scenes``: any folder-per-class set, the class list being its folders.
* ``rsvqa``: RSVQA-LR / RSVQA-HR: ``root/*_split_<split>_questions.json`` and
  ``..._answers.json`` (``{"questions": [{"id", "img_id", "type", "question", "answers_ids",
  "active"}]}``, ``{"answers": [{"id", "answer", "active"}]}``), images ``<img_id>.<ext>`` in
  ``Images_LR/``, ``Data/``, ``Images/``, ``images/`` or the root.
* ``dior-rsvg``: ``root/Annotations/*.xml`` (VOC XML with ``<description>``), ``JPEGImages/``,
  optional ``root/<split>.txt`` of global object indices (objects counted over the sorted XML
  files, as the data set's loader and :func:`~engine.data.real_datasets.load_dior_rsvg` do).
* ``geochat-bench``: GeoChat-Bench referring / grounding JSONL (or a JSON list): records with
  ``question_id``, ``image_id`` (``.png`` added when it has no extension) or ``image``,
  ``question``, ``ground_truth`` and ``type`` (``"ref"`` for referring, anything else grounding).
* ``captions``: Karpathy-style caption JSON (UCM-Captions, Sydney-Captions, RSICD:
  ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``) or a plain list of
  ``{"image", "captions": [...]}``.
"""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.grounding import GRID_MAX, GridBox, parse_boxes

from .real_datasets import IMAGE_EXTENSIONS

__all__ = [
    "PUBLISHED_CLASSES", "FORMATS", "BenchItem", "Benchmark", "class_key", "read_benchmark",
    "read_scene_folder", "read_rsvqa", "read_dior_rsvg", "read_geochat_bench", "read_captions",
]

PUBLISHED_CLASSES: dict[str, tuple[str, ...]] = {
    "ucm": ("agricultural", "airplane", "baseball diamond", "beach", "buildings", "chaparral",
            "dense residential", "forest", "freeway", "golf course", "harbor", "intersection",
            "medium residential", "mobile home park", "overpass", "parking lot", "river", "runway",
            "sparse residential", "storage tanks", "tennis court"),
    "aid": ("airport", "bare land", "baseball field", "beach", "bridge", "center", "church",
            "commercial", "dense residential", "desert", "farmland", "forest", "industrial",
            "meadow", "medium residential", "mountain", "park", "parking", "playground", "pond",
            "port", "railway station", "resort", "river", "school", "sparse residential", "square",
            "stadium", "storage tanks", "viaduct"),
    "nwpu": ("airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge",
             "chaparral", "church", "circular farmland", "cloud", "commercial area",
             "dense residential", "desert", "forest", "freeway", "golf course",
             "ground track field", "harbor", "industrial area", "intersection", "island", "lake",
             "meadow", "medium residential", "mobile home park", "mountain", "overpass", "palace",
             "parking lot", "railway", "railway station", "rectangular farmland", "river",
             "roundabout", "runway", "sea ice", "ship", "snowberg", "sparse residential",
             "stadium", "storage tank", "tennis court", "terrace", "thermal power station",
             "wetland"),
}
"""The class lists of UC Merced (21), AID (30) and NWPU-RESISC45 (45), in words, as published."""


@dataclass
class BenchItem:
    """One question of a benchmark: its image, the task, the per-item text and the references.

    ``text`` is what varies per item (the VQA question, the referring expression; empty for scene
    classes and captions); ``boxes`` are reference boxes on an exact (unrounded) 0-100 grid.
    """

    key: str
    image: Path
    task: str
    text: str
    references: list[str]
    qtype: str
    boxes: list[GridBox] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    """A data set's items, the annotation files read, its class list and stated conventions."""

    format: str
    root: Path
    items: list[BenchItem]
    annotation_files: list[Path]
    classes: list[str] = field(default_factory=list)
    conventions: dict[str, str] = field(default_factory=dict)


def class_key(name: str) -> str:
    """Lower case, letters and digits only: 'Dense_Residential' and 'dense residential.' agree."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _words(name: str) -> str:
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(re.sub(r"[_\-./]+", " ", s).lower().split())


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


# -- scene classification ---------------------------------------------------------------------
def read_scene_folder(root: str | os.PathLike, fmt: str = "scenes") -> Benchmark:
    """Folder-per-class items; with ``fmt`` ucm/aid/nwpu the class list is the published one and
    a folder matching no published class is refused (its name is in the error)."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if fmt in PUBLISHED_CLASSES:
        classes = list(PUBLISHED_CLASSES[fmt])
        by_key = {class_key(c): c for c in classes}
        unknown = [d.name for d in folders if class_key(d.name) not in by_key]
        if unknown:
            raise ValueError(f"{root}: folders {unknown} match no {fmt} class; the published classes are "
                             f"{', '.join(classes)} (use the 'scenes' format for another class list)")
        names = {d.name: by_key[class_key(d.name)] for d in folders}
    else:
        names = {d.name: _words(d.name) for d in folders}
        classes = sorted(set(names.values()))
    items = [BenchItem(f"{d.name}/{f.name}", f, "classify", "", [names[d.name]], names[d.name])
             for d in folders for f in _images_in(d)]
    if not items:
        raise ValueError(f"{root} holds no class folders with images")
    return Benchmark(fmt, root, items, [], classes, {
        "classes": "the published class list in the prompt" if fmt in PUBLISHED_CLASSES
        else "the folder names (in words) are the class list"})


# -- RSVQA ------------------------------------------------------------------------------------
_RSVQA_IMAGE_DIRS = ("Images_LR", "Data", "Images", "images", ".")


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise ValueError(f"{root}: expected one file matching {pattern}, found {[p.name for p in found]}")
    return found[0]


def _rsvqa_image(root: Path, img_id: Any, cache: dict[str, Path]) -> Path | None:
    if not cache:
        for sub in _RSVQA_IMAGE_DIRS:
            folder = root / sub
            if folder.is_dir():
                for f in _images_in(folder):
                    cache.setdefault(f.stem, f)
    return cache.get(str(img_id))


def read_rsvqa(root: str | os.PathLike, split: str = "test") -> Benchmark:
    """RSVQA-LR / -HR questions of ``split`` with their (first active) answer; inactive questions
    and questions whose image is missing are left out (the latter counted in ``conventions``)."""
    root = Path(root)
    qfile = _one(root, f"*_split_{split}_questions.json")
    afile = _one(root, f"*_split_{split}_answers.json")
    questions = json.loads(qfile.read_text(encoding="utf-8"))["questions"]
    answers = {a["id"]: a for a in json.loads(afile.read_text(encoding="utf-8"))["answers"]
               if a.get("active", True)}
    cache: dict[str, Path] = {}
    items, missing = [], 0
    for q in questions:
        if not q.get("active", True):
            continue
        refs = [str(answers[i]["answer"]) for i in q.get("answers_ids", []) if i in answers]
        if not refs:
            continue
        image = _rsvqa_image(root, q["img_id"], cache)
        if image is None:
            missing += 1
            continue
        items.append(BenchItem(str(q["id"]), image, "vqa", " ".join(str(q["question"]).split()), refs[:1],
                               str(q.get("type", "other")), meta={"img_id": q["img_id"]}))
    return Benchmark("rsvqa", root, items, [qfile, afile], [], {
        "answers": "normalised exact match (engine.lab.metrics.normalize_answer) against the first active answer",
        "skipped_missing_images": str(missing)})


# -- DIOR-RSVG --------------------------------------------------------------------------------
def read_dior_rsvg(root: str | os.PathLike, split: str | None = "test", plus_one: bool = False) -> Benchmark:
    """DIOR-RSVG referring items with exact reference boxes.

    ``bndbox`` is read as pixel *edges* (width ``xmax - xmin``), the convention of the data set's
    own loader; ``plus_one`` reads it the VOC way instead, as 1-based inclusive pixel indices
    (edges ``xmin - 1 .. xmax``, width ``xmax - xmin + 1``).  The split file is used when it exists
    (``split=None``: every object).
    """
    root = Path(root)
    split_file = root / f"{split}.txt" if split else None
    keep = None
    read = []
    if split_file is not None and split_file.is_file():
        keep = {int(x) for x in split_file.read_text().split() if x.strip().lstrip("-").isdigit()}
        read.append(split_file)
    items: list[BenchItem] = []
    count = -1
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        read.append(xml_path)
        tree = ET.parse(xml_path).getroot()
        fname = (tree.findtext("filename") or xml_path.stem + ".jpg").strip()
        size = tree.find("size")
        width = float(size.findtext("width")) if size is not None and size.findtext("width") else None
        height = float(size.findtext("height")) if size is not None and size.findtext("height") else None
        for obj in tree.findall("object"):
            count += 1
            bb, desc = obj.find("bndbox"), (obj.findtext("description") or "").strip()
            if (keep is not None and count not in keep) or bb is None or not desc:
                continue
            image = root / "JPEGImages" / fname
            if width is None or height is None:
                from PIL import Image

                with Image.open(image) as im:
                    width, height = float(im.size[0]), float(im.size[1])
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if plus_one:
                x1, y1 = x1 - 1.0, y1 - 1.0
            box = GridBox(x1 / width * GRID_MAX, y1 / height * GRID_MAX, x2 / width * GRID_MAX,
                          y2 / height * GRID_MAX, 0.0, (obj.findtext("name") or "").strip())
            phrase = desc.rstrip(" .")
            items.append(BenchItem(f"{xml_path.stem}#{count}", image, "ground", phrase[:1].lower() + phrase[1:],
                                   [desc], "ref", [box], meta={"object_index": count,
                                                               "pixel_box": [x1, y1, x2, y2],
                                                               "image_size": [width, height]}))
    return Benchmark("dior-rsvg", root, items, read, [], {
        "bndbox": ("1-based inclusive pixel indices (+1): edges xmin-1..xmax, width xmax-xmin+1" if plus_one else
                   "pixel edges, no +1: width xmax-xmin (the data set's loader); --voc-plus-one for the VOC reading"),
        "iou": "on the exact 0-100 grid of each image (pixel/size*100, unrounded): equal to pixel IoU for axis-aligned "
               "boxes",
        "split": str(split_file.name) if keep is not None else "all objects (no split file)"})


# -- GeoChat-Bench referring / grounding ------------------------------------------------------
def _corners_to_box(points: list) -> GridBox:
    """Four (x, y) corners of a rotated rectangle -> centre, size and clockwise angle."""
    import math

    (ax, ay), (bx, by), (cx, cy) = (map(float, p) for p in points[:3])
    w, h = math.hypot(bx - ax, by - ay), math.hypot(cx - bx, cy - by)
    mx, my = sum(float(p[0]) for p in points[:4]) / 4, sum(float(p[1]) for p in points[:4]) / 4
    angle = math.degrees(math.atan2(by - ay, bx - ax))
    angle = ((angle + 90.0) % 180.0) - 90.0
    return GridBox(mx - w / 2, my - h / 2, mx + w / 2, my + h / 2, angle)


def _gt_boxes(value: Any) -> list[GridBox]:
    """Reference boxes from GeoChat-Bench's ``ground_truth``: box text in GeoChat's syntax, one
    ``[x1, y1, x2, y2(, angle)]``, four ``[x, y]`` corners, or a list of these; 0-100 grid."""
    if isinstance(value, str):
        return parse_boxes(value)
    if not isinstance(value, (list, tuple)) or not value:
        return []
    if all(isinstance(v, (int, float)) for v in value) and len(value) in (4, 5):
        x1, y1, x2, y2 = (float(v) for v in value[:4])
        return [GridBox(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), float(value[4]) if len(value) == 5 else 0.0)]
    if len(value) == 4 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        return [_corners_to_box(list(value))]
    return [b for v in value for b in _gt_boxes(v)]


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else list(data.get("questions") or data.get("data") or [])


def _annotation_file(path: Path, split: str | None) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
    if split and len(files) > 1:
        files = [p for p in files if split in p.stem] or files
    if len(files) != 1:
        raise ValueError(f"{path}: expected one .json/.jsonl annotation file, found {[p.name for p in files]}")
    return files[0]


def _image_under(folder: Path, name: str) -> Path:
    for base in (folder / "images", folder):
        if (base / name).is_file():
            return base / name
    return folder / name


def read_geochat_bench(path: str | os.PathLike, split: str | None = None) -> Benchmark:
    """GeoChat-Bench referring/grounding records; images next to the file or in ``images/``."""
    ann = _annotation_file(Path(path), split)
    folder = ann.parent
    items = []
    for i, rec in enumerate(_records(ann)):
        name = str(rec.get("image") or rec.get("image_id"))
        if not Path(name).suffix:
            name += ".png"
        boxes = _gt_boxes(rec.get("ground_truth"))
        qtype = "ref" if str(rec.get("type", "ref")).lower() in ("ref", "refer", "referring") else "grounding"
        items.append(BenchItem(str(rec.get("question_id", i)), _image_under(folder, name), "ground",
                               " ".join(str(rec.get("question", "")).split()), [str(rec.get("ground_truth"))],
                               qtype, boxes, meta={k: rec[k] for k in ("size_group", "dataset") if k in rec}))
    return Benchmark("geochat-bench", folder, items, [ann], [], {
        "boxes": "0-100 grid (GeoChat), rotated by their angle (degrees clockwise) when one is given; IoU of the "
                 "rotated polygons (shapely)"})


# -- captions ---------------------------------------------------------------------------------
def read_captions(path: str | os.PathLike, split: str | None = "test") -> Benchmark:
    """Caption items of ``split`` (Karpathy ``split`` field; every image when absent) with all
    their reference sentences; images in ``images/``, ``imgs/``, next to the JSON or in any
    folder beside it (RSICD's ``RSICD_images/``)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("dataset*.json")) or sorted(path.glob("*.json"))
        if len(candidates) != 1:
            raise ValueError(f"{path}: expected one caption JSON, found {[p.name for p in candidates]}")
        path = candidates[0]
    data = json.loads(path.read_text(encoding="utf-8"))
    records = data.get("images", []) if isinstance(data, dict) else data
    folder = path.parent
    bases = [folder / "images", folder / "imgs", folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    items = []
    for i, rec in enumerate(records):
        if split and rec.get("split") not in (None, split):
            continue
        name = str(rec.get("filename") or rec.get("image"))
        refs = [str(s.get("raw", "")) if isinstance(s, dict) else str(s)
                for s in rec.get("sentences") or rec.get("captions") or []]
        image = next((b / name for b in bases if (b / name).is_file()), folder / "images" / name)
        items.append(BenchItem(str(rec.get("imgid", name)), image, "caption", "", refs, "caption"))
    return Benchmark("captions", folder, items, [path], [], {
        "tokens": "lower case, punctuation removed (engine.lab.metrics.caption_tokens, no JVM PTBTokenizer)",
        "corpus": "BLEU-4 and CIDEr over the whole evaluated corpus (pycocoevalcap), all references of an image"})


FORMATS: dict[str, Callable[..., Benchmark]] = {
    "ucm": lambda p, split, **kw: read_scene_folder(p, "ucm"),
    "aid": lambda p, split, **kw: read_scene_folder(p, "aid"),
    "nwpu": lambda p, split, **kw: read_scene_folder(p, "nwpu"),
    "scenes": lambda p, split, **kw: read_scene_folder(p, "scenes"),
    "rsvqa": lambda p, split, **kw: read_rsvqa(p, split or "test"),
    "dior-rsvg": lambda p, split, **kw: read_dior_rsvg(p, split, plus_one=kw.get("plus_one", False)),
    "geochat-bench": lambda p, split, **kw: read_geochat_bench(p, split),
    "captions": lambda p, split, **kw: read_captions(p, split),
}
"""``FORMAT`` of ``--dataset FORMAT:PATH`` -> reader ``(path, split, **options)``."""


def read_benchmark(spec: str, split: str | None = "test", plus_one: bool = False) -> Benchmark:
    """``"ucm:/data/UCMerced_LandUse/Images"`` -> its :class:`Benchmark`; unknown formats and
    missing paths raise ``ValueError`` naming the choices."""
    fmt, sep, path = str(spec).partition(":")
    fmt = fmt.strip().lower()
    if not sep or fmt not in FORMATS:
        raise ValueError(f"--dataset must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}; got {spec!r}")
    if not Path(path).exists():
        raise ValueError(f"dataset path {path} does not exist")
    return FORMATS[fmt](Path(path), split, plus_one=plus_one)
