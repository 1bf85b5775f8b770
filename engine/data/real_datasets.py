"""Loaders for real remote-sensing data in their published formats, as ``Sample`` streams.

Why: the embedded model is trained on synthetic scenes only because nothing can be downloaded
where it is built; a user who has real data (or a GPU) trains the same model on it with the same
code.  Each loader yields the synthetic pipeline's :class:`~engine.data.instructions.Sample`, with
the image loaded by Pillow and resized to the model input and boxes on the resolution-independent
0-100 grid, so training and evaluation do not care where a sample came from.

Formats:

* LLaVA / GeoChat instruction JSON: a list of ``{"id", "image", "conversations": [{"from":
  "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`` with ``image``
  relative to an image folder; GeoChat grounding answers already carry box text.
* Folder-per-class scene data sets (UC Merced, AID, NWPU-RESISC45): ``root/<class>/<image>``;
  folder names are mapped to this project's scene classes by :data:`SCENE_ALIASES`.
* DIOR-RSVG: ``root/Annotations/*.xml`` (VOC XML whose ``<object>`` has ``<name>``,
  ``<bndbox>`` and a ``<description>`` referring expression), ``root/JPEGImages/``, and optional
  split files ``root/<split>.txt`` listing global object indices (objects counted across the
  sorted annotation files, as in the data set's reference loader).
"""
from __future__ import annotations

import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from engine.grounding import format_grounded, parse_boxes, pixels_to_grid
from .instructions import Sample
from .scene_generator import OBJECT_CLASSES, SCENE_CLASSES

__all__ = [
    "SCENE_ALIASES", "OBJECT_ALIASES", "IMAGE_EXTENSIONS", "canonical_scene_name",
    "canonical_object_name", "load_image", "load_llava_json", "load_scene_folder",
    "load_dior_rsvg",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")

# Compact keys (lower case, no separators) -> canonical scene class.
SCENE_ALIASES: dict[str, str] = {
    "airport": "airport", "airplane": "airport", "airfield": "airport", "runway": "airport",
    "harbor": "harbor", "harbour": "harbor", "port": "harbor",
    "residential": "residential", "denseresidential": "residential",
    "mediumresidential": "residential", "sparseresidential": "residential",
    "mobilehomepark": "residential",
    "industrial": "industrial", "industrialarea": "industrial", "storagetanks": "industrial",
    "farmland": "farmland", "agricultural": "farmland", "circularfarmland": "farmland",
    "rectangularfarmland": "farmland", "terrace": "farmland", "meadow": "farmland",
    "forest": "forest", "chaparral": "forest",
    "parkinglot": "parking lot", "parking": "parking lot",
    "river": "river", "bridge": "river",
    "sportsfield": "sports field", "tenniscourt": "sports field", "playground": "sports field",
    "groundtrackfield": "sports field", "stadium": "sports field", "baseballdiamond": "sports field",
    "baseballfield": "sports field", "golfcourse": "sports field",
    "bareland": "bare land", "desert": "bare land",
}
OBJECT_ALIASES: dict[str, str] = {
    "airplane": "airplane", "plane": "airplane", "aircraft": "airplane",
    "ship": "ship", "boat": "ship", "vessel": "ship",
    "storagetank": "storage tank", "tank": "storage tank",
    "vehicle": "vehicle", "smallvehicle": "vehicle", "largevehicle": "vehicle", "car": "vehicle",
    "building": "building", "house": "building",
    "tenniscourt": "tennis court", "bridge": "bridge",
    "swimmingpool": "swimming pool", "pool": "swimming pool",
}


def _compact(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _words(name: str) -> str:
    """'DenseResidential' / 'dense_residential' -> 'dense residential'."""
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(re.sub(r"[_\-./]+", " ", s).lower().split())


def canonical_scene_name(name: str) -> str | None:
    """This project's scene class for a data set's class name, or None when unknown."""
    key = _compact(name)
    if key in SCENE_ALIASES:
        return SCENE_ALIASES[key]
    words = _words(name)
    return words if words in SCENE_CLASSES else None


def canonical_object_name(name: str) -> str | None:
    """This project's object class for a data set's object name, or None when unknown."""
    key = _compact(name)
    if key in OBJECT_ALIASES:
        return OBJECT_ALIASES[key]
    if key.endswith("s") and key[:-1] in OBJECT_ALIASES:
        return OBJECT_ALIASES[key[:-1]]
    return None


def load_image(path: str | os.PathLike, image_size: int | None = 128
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """Image as (H, W, 3) uint8 resized to ``image_size`` square, and its original (w, h).

    16-bit and float images (some GeoTIFF scene sets) are stretched to 8 bits between their 2nd
    and 98th percentiles; an area filter is used when shrinking.
    """
    with Image.open(path) as im:
        im.load()
        size = im.size
        if im.mode in ("I;16", "I;16B", "I", "F"):
            a = np.asarray(im, dtype=np.float32)
            lo, hi = np.percentile(a, (2, 98))
            a = np.clip((a - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
            im = Image.fromarray(a)
        rgb = im.convert("RGB")
    if image_size is not None and rgb.size != (image_size, image_size):
        shrink = image_size < min(rgb.size)
        rgb = rgb.resize((image_size, image_size), Image.BOX if shrink else Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), size


def _targets(scene: str | None, text: str) -> dict[str, list[str]]:
    """Knowledge targets recoverable from text: the scene class and object names mentioned."""
    low = " " + _words(text) + " "
    objs = [c for c in OBJECT_CLASSES if f" {c} " in low or f" {c}s " in low]
    return {"scene": [scene] if scene else [], "object": objs, "region": []}


_YES_NO = {"yes", "no"}


def _vqa_qtype(q: str, a: str) -> str:
    ql, al = q.lower(), a.lower().strip(" .")
    if "how many" in ql or "number of" in ql:
        return "counting"
    if "colour" in ql or "color" in ql:
        return "colour"
    if " than " in ql and al in _YES_NO:
        return "comparison"
    if "where" in ql or "left or right" in ql or "above or below" in ql:
        return "position"
    if "land cover" in ql or "land use" in ql:
        return "land_cover"
    if "scene" in ql or "kind of area" in ql or "type of place" in ql:
        return "scene"
    if al in _YES_NO:
        return "presence"
    return "other"


def _infer_task(q: str, a: str) -> tuple[str, str]:
    ql = q.lower()
    if parse_boxes(a) or ql.startswith(("[refer]", "[grounding]")):
        return "ground", ("ground_ref" if ql.startswith("[refer]") else "ground_all")
    if ql.startswith(("[caption]", "[identify]")) or any(
            w in ql for w in ("describe", "caption", "description")):
        return "caption", "caption"
    if "classify" in ql or (("scene" in ql or "category" in ql or "class" in ql)
                            and canonical_scene_name(a.strip(" .")) is not None
                            and len(a.split()) <= 3):
        return "classify", "classify"
    return "vqa", _vqa_qtype(q, a)


def load_llava_json(json_path: str | os.PathLike, image_root: str | os.PathLike,
                    image_size: int = 128, skip_missing: bool = True) -> Iterator[Sample]:
    """Samples from a LLaVA/GeoChat conversation file, one per human/gpt turn pair.

    The task is inferred from the turn: box text in the answer or a ``[refer]``/``[grounding]``
    tag -> ground (boxes parsed into ``Sample.boxes``); description requests -> caption; scene
    class answers to classification questions -> classify; anything else -> vqa.
    """
    records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    root = Path(image_root)
    for rec in records:
        path = root / rec["image"]
        if not path.exists():
            if skip_missing:
                log.warning("image %s of record %s not found; skipped", path, rec.get("id"))
                continue
            raise FileNotFoundError(path)
        image, _ = load_image(path, image_size)
        turns = rec.get("conversations", [])
        for i in range(0, len(turns) - 1, 2):
            hu, gp = turns[i], turns[i + 1]
            if hu.get("from") not in ("human", "user") or gp.get("from") not in ("gpt", "assistant"):
                continue
            q = " ".join(hu["value"].replace("<image>", " ").split())
            a = gp["value"].strip()
            task, qtype = _infer_task(q, a)
            scene = canonical_scene_name(a.strip(" .")) if task == "classify" else None
            if task == "classify":
                a = scene or a
            boxes = parse_boxes(a) if task == "ground" else []
            yield Sample(image, task, q, a, qtype, _targets(scene, q + " " + a), boxes=boxes,
                         meta={"source": str(path), "id": rec.get("id"), "turn": i // 2})


def load_scene_folder(root: str | os.PathLike, image_size: int = 128, only_known: bool = False,
                      question: str = "What type of scene is this?") -> Iterator[Sample]:
    """Classification samples from ``root/<class>/<image>`` (UC Merced / AID / NWPU layout).

    The answer is the canonical scene class when the folder name is known to
    :data:`SCENE_ALIASES`, else the folder name in words (skipped when ``only_known``).
    """
    root = Path(root)
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        name = canonical_scene_name(d.name)
        if name is None and only_known:
            continue
        answer = name or _words(d.name)
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            image, _ = load_image(f, image_size)
            yield Sample(image, "classify", question, answer, "classify",
                         {"scene": [name] if name else [], "object": [], "region": []},
                         meta={"source": str(f), "folder": d.name})


def _split_indices(root: Path, split: str | None) -> set[int] | None:
    if split is None:
        return None
    lines = (root / f"{split}.txt").read_text().split()
    return {int(x) for x in lines if x.strip().lstrip("-").isdigit()}


def load_dior_rsvg(root: str | os.PathLike, split: str | None = None, image_size: int = 128,
                   image_dir: str = "JPEGImages", ann_dir: str = "Annotations"
                   ) -> Iterator[Sample]:
    """Referring-grounding samples from DIOR-RSVG, one per annotated object.

    ``bndbox`` values are taken as pixel edges of the original image (as the data set's loader
    does) and converted to the 0-100 grid using the image size from ``<size>`` (or the file).
    """
    root = Path(root)
    keep = _split_indices(root, split)
    count = -1
    for xml_path in sorted((root / ann_dir).glob("*.xml")):
        tree = ET.parse(xml_path).getroot()
        fname = (tree.findtext("filename") or xml_path.stem + ".jpg").strip()
        image = None
        size = None
        sz = tree.find("size")
        if sz is not None and sz.findtext("width") and sz.findtext("height"):
            size = (float(sz.findtext("width")), float(sz.findtext("height")))
        for obj in tree.findall("object"):
            count += 1
            if keep is not None and count not in keep:
                continue
            bb = obj.find("bndbox")
            desc = (obj.findtext("description") or "").strip()
            raw = (obj.findtext("name") or "").strip()
            if bb is None or not desc:
                continue
            if image is None:
                image, orig = load_image(root / image_dir / fname, image_size)
                size = size or (float(orig[0]), float(orig[1]))
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            label = canonical_object_name(raw) or _words(raw)
            box = pixels_to_grid(x1, y1, x2, y2, 0.0, size[0], size[1], label)
            phrase = desc.rstrip(" .")
            phrase = phrase[:1].lower() + phrase[1:]
            yield Sample(image, "ground", f"[refer] Give the location of {phrase}.",
                         format_grounded([(label, [box])]), "ground_ref",
                         _targets(None, label + " " + desc), boxes=[box],
                         meta={"source": str(xml_path), "object_index": count, "name": raw})
