"""Real-data loaders parse their published formats (tiny fabricated files) into Samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.data.real_datasets import (
    canonical_scene_name, load_dior_rsvg, load_image, load_llava_json, load_scene_folder,
)


def _img(path, size=(64, 48), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_llava_geochat_json_gives_one_sample_per_turn_with_inferred_tasks(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": "A harbor with two ships."},
            {"from": "human", "value": "How many ships are there?"},
            {"from": "gpt", "value": "2"},
            {"from": "human", "value": "[refer] Where is the small ship?"},
            {"from": "gpt", "value": "{<10><20><30><40>|15}"},
            {"from": "human", "value": "Classify this image."},
            {"from": "gpt", "value": "Harbour"},
        ]},
        {"id": "2", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there a ship?"}, {"from": "gpt", "value": "Yes"}]},
    ]
    path = tmp_path / "geochat.json"
    path.write_text(json.dumps(records))
    samples = list(load_llava_json(path, tmp_path / "imgs", image_size=32))
    assert [(s.task, s.qtype) for s in samples] == [
        ("caption", "caption"), ("vqa", "counting"), ("ground", "ground_ref"),
        ("classify", "classify")]
    assert samples[0].question == "Describe this image." and samples[0].image.shape == (32, 32, 3)
    b = samples[2].boxes[0]
    assert (b.x1, b.y1, b.x2, b.y2, b.angle) == (10, 20, 30, 40, 15)
    assert samples[3].answer == "harbor" and samples[3].knowledge_targets["scene"] == ["harbor"]
    assert samples[1].knowledge_targets["object"] == ["ship"]


def test_scene_folders_map_to_canonical_classes(tmp_path):
    _img(tmp_path / "DenseResidential" / "d1.tif")
    _img(tmp_path / "airplane" / "a1.jpg")
    (tmp_path / "airplane" / "notes.txt").write_text("not an image: ignored")
    _img(tmp_path / "beach" / "b1.png")
    samples = list(load_scene_folder(tmp_path, image_size=16))
    assert [(s.task, s.answer) for s in samples] == [
        ("classify", "residential"), ("classify", "airport"), ("classify", "beach")]
    assert [s.answer for s in load_scene_folder(tmp_path, only_known=True)] == [
        "residential", "airport"]
    assert canonical_scene_name("parking_lot") == "parking lot"
    assert canonical_scene_name("Ground-Track-Field") == "sports field"


DIOR_XML = """<annotation><filename>00001.jpg</filename>
<size><width>800</width><height>400</height><depth>3</depth></size>
<object><name>storagetank</name><bndbox><xmin>80</xmin><ymin>40</ymin><xmax>160</xmax>
<ymax>120</ymax></bndbox><description>The storage tank at the top left.</description></object>
<object><name>vehicle</name><bndbox><xmin>400</xmin><ymin>200</ymin><xmax>420</xmax>
<ymax>210</ymax></bndbox><description>A white vehicle in the middle</description></object>
</annotation>"""


def test_dior_rsvg_gives_referring_samples_on_the_grid(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "00001.xml").write_text(DIOR_XML)
    _img(tmp_path / "JPEGImages" / "00001.jpg", size=(800, 400))
    (tmp_path / "test.txt").write_text("1\n")
    all_s = list(load_dior_rsvg(tmp_path, image_size=64))
    assert len(all_s) == 2
    s = all_s[0]
    assert s.task == "ground" and s.qtype == "ground_ref"
    assert s.question == "[refer] Give the location of the storage tank at the top left."
    assert s.answer == "storage tank {<10><10><20><30>|0}"
    assert s.image.shape == (64, 64, 3)
    only = list(load_dior_rsvg(tmp_path, split="test"))
    assert [x.meta["name"] for x in only] == ["vehicle"]
    b = only[0].boxes[0]
    assert (b.x1, b.y1, b.x2, b.y2) == (50, 50, 53, 53)


def test_sixteen_bit_images_are_stretched_to_eight_bits(tmp_path):
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 10)
    Image.fromarray(a).save(tmp_path / "x.tif")
    img, size = load_image(tmp_path / "x.tif", 32)
    assert size == (64, 64) and img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert img.min() == 0 and img.max() == 255


def test_missing_image_can_be_an_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"id": 1, "image": "no.png", "conversations": []}]))
    with pytest.raises(FileNotFoundError):
        list(load_llava_json(tmp_path / "x.json", tmp_path, skip_missing=False))
