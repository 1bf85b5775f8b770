"""The frozen benchmark evaluator (``python -m engine evaluate --dataset FORMAT:PATH``).

Every format is fabricated here (a few images each) and evaluated with a tiny random LLaVA folder
whose answers are scripted token by token (:class:`Script`), so each metric is checked against a
value computed by hand; the embedded model runs once on a folder-per-class set of synthetic scenes.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_llava_backend import char_tokenizer, tiny_llava_config

from engine.backends import load_pipeline
from engine.data.benchmark_formats import PUBLISHED_CLASSES, BenchItem, read_benchmark, read_geochat_bench
from engine.lab.dataset_eval import dataset_checksum, evaluate_pipeline, select_items


# -- a model whose answers are known --------------------------------------------------------------
class Script:
    """A LogitsProcessor writing the next scripted text on every row a generation starts, in the
    order the rows are asked (a row's text, then ``</s>``)."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.queue = tokenizer, list(texts)
        self.prev: torch.Tensor | None = None
        self.rows: list[list[int]] = []
        self.start = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        continuing = (self.prev is not None and input_ids.shape[0] == self.prev.shape[0]
                      and input_ids.shape[1] == self.prev.shape[1] + 1 and torch.equal(input_ids[:, :-1], self.prev))
        if not continuing:
            texts = [self.queue.pop(0) for _ in range(input_ids.shape[0])]
            eos = self.tokenizer.eos_token_id
            self.rows = [self.tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
            self.start = input_ids.shape[1]
        self.prev = input_ids.clone()
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(self.rows):
            forced[row, ids[min(step, len(ids) - 1)]] = 0.0
        return forced


def write_long_llava(folder: Path, init_range: float = 0.02) -> Path:
    """A tiny random LLaVA folder with room for long class-list prompts (one token per character);
    a larger ``init_range`` gives its frozen output layer logits wide enough to learn through."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    tok = char_tokenizer()
    config = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"))
    config.text_config.max_position_embeddings = 2048
    config.text_config.initializer_range = init_range
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_pipeline(write_long_llava(tmp_path_factory.mktemp("eval-llava") / "tiny-llava"), "cpu")


def scripted(pipeline, bench, answers: list[str], **kw) -> dict:
    pipeline.logits_processors = [Script(pipeline.tokenizer, answers)]
    try:
        return evaluate_pipeline(pipeline, bench, **kw)
    finally:
        pipeline.logits_processors = []


def save_image(path: Path, seed: int, size: int = 32, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# -- fabricated data sets ---------------------------------------------------------------------------
@pytest.fixture
def ucm(tmp_path) -> Path:
    root = tmp_path / "UCMerced_LandUse" / "Images"
    for c, folder in enumerate(("agricultural", "denseresidential", "beach")):
        for k in range(2):
            save_image(root / folder / f"{folder}{k:02d}.png", 10 * c + k)
    return root


@pytest.fixture
def rsvqa(tmp_path) -> Path:
    root = tmp_path / "RSVQA_LR"
    for img in (0, 1):
        save_image(root / "Images_LR" / f"{img}.tif", img, fmt="TIFF")
    rows = [(0, 0, "presence", "Is there a road?", "yes"),
            (1, 0, "comparison", "Is the number of roads equal to the number of water areas?", "no"),
            (2, 0, "rural_urban", "Is it a rural or an urban area", "rural"),
            (3, 1, "count", "How many buildings are there?", "12"),
            (4, 1, "presence", "Is there a water area?", "no"),
            (5, 1, "count", "How many roads are there?", "3"),
            (6, 1, "presence", "Is there a farmland?", "yes")]
    questions = [{"id": q, "img_id": img, "type": t, "question": text, "answers_ids": [100 + q], "active": q != 6}
                 for q, img, t, text, _ in rows]
    answers = [{"id": 100 + q, "question_id": q, "answer": a, "active": True} for q, *_, a in rows]
    (root / "LR_split_test_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "LR_split_test_answers.json").write_text(json.dumps({"answers": answers}))
    return root


def voc_xml(path: Path, filename: str, objects: list[tuple[str, tuple[int, int, int, int], str]]) -> None:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = filename
    size = ET.SubElement(ann, "size")
    for k, v in (("width", "200"), ("height", "200"), ("depth", "3")):
        ET.SubElement(size, k).text = v
    for name, box, desc in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, k).text = str(v)
        ET.SubElement(obj, "description").text = desc
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(ann).write(path)


@pytest.fixture
def dior(tmp_path) -> Path:
    root = tmp_path / "DIOR_RSVG"
    save_image(root / "JPEGImages" / "00001.jpg", 1, 200, "JPEG")
    save_image(root / "JPEGImages" / "00002.jpg", 2, 200, "JPEG")
    voc_xml(root / "Annotations" / "00001.xml", "00001.jpg", [
        ("vehicle", (20, 40, 60, 100), "The vehicle on the left."),
        ("storagetank", (100, 100, 160, 160), "the storage tank at the bottom right"),
        ("ship", (0, 0, 10, 10), "the tiny ship")])                         # object 2: not in the split
    voc_xml(root / "Annotations" / "00002.xml", "00002.jpg", [
        ("airplane", (0, 0, 100, 100), "the large airplane")])
    (root / "test.txt").write_text("0\n1\n3\n")
    return root


@pytest.fixture
def geochat(tmp_path) -> Path:
    root = tmp_path / "GeoChat_Bench"
    save_image(root / "images" / "P0001.png", 5, 64)
    records = [{"question_id": 1, "image_id": "P0001", "question": "the plane on the left", "type": "ref",
                "ground_truth": [40, 40, 60, 60, 45], "size_group": "small"},
               {"question_id": 2, "image_id": "P0001", "question": "all ships", "type": "grounding",
                "ground_truth": "{<0><0><10><10>|0}{<50><50><70><70>|0}"}]
    (root / "referring.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root


CAPTIONS = [["a large airport with many planes parked", "many planes are parked at the airport"],
            ["a river runs through the green forest land", "green trees on both sides of a river"],
            ["a dense residential area with many houses", "many houses are built close together"]]


@pytest.fixture
def captions(tmp_path) -> Path:
    root = tmp_path / "UCM_captions"
    images = [{"filename": f"{i}.png", "imgid": i, "split": "test", "sentences": [{"raw": s} for s in refs]}
              for i, refs in enumerate(CAPTIONS)]
    images.append({"filename": "9.png", "imgid": 9, "split": "train", "sentences": [{"raw": "not evaluated"}]})
    for rec in images:
        save_image(root / "imgs" / rec["filename"], rec["imgid"])
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root


# -- scene classification ---------------------------------------------------------------------------
UCM_ANSWERS = ["Agricultural.", "a cat", "forest", "Beach", "dense residential", "DenseResidential"]


def test_scene_accuracy_matches_answers_ignoring_case_spaces_and_punctuation(llava, ucm):
    result = scripted(llava, read_benchmark(f"ucm:{ucm}"), UCM_ANSWERS)
    metrics = result["metrics"]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"] == pytest.approx({"agricultural": 0.5, "beach": 0.5, "dense residential": 1.0})
    assert metrics["answers_outside_class_list"] == 1                       # "a cat"; "forest" is a UCM class
    assert [(f["key"], f["reason"]) for f in result["failures"]] == [
        ("agricultural/agricultural01.png", "not a class of the list"), ("beach/beach00.png", "other class")]


def test_scene_prompt_lists_the_published_classes_and_is_recorded_as_rendered(llava, ucm):
    result = scripted(llava, read_benchmark(f"ucm:{ucm}"), UCM_ANSWERS)
    rendered = result["prompts"]["classify"]["example_rendered"]
    classes = ", ".join(PUBLISHED_CLASSES["ucm"])
    assert len(PUBLISHED_CLASSES["ucm"]) == 21 and result["dataset"]["classes"] == list(PUBLISHED_CLASSES["ucm"])
    assert rendered.endswith(f"USER: <image>\nClassify the image within one of the given classes: {classes}. "
                             "Answer with one word or short phrase. ASSISTANT:")


def test_scene_folder_matching_no_published_class_is_refused(tmp_path):
    save_image(tmp_path / "aid" / "Volcano" / "v1.png", 0)
    with pytest.raises(ValueError, match="Volcano"):
        read_benchmark(f"aid:{tmp_path / 'aid'}")


# -- RSVQA ------------------------------------------------------------------------------------------
def test_rsvqa_accuracy_per_type_and_overall_with_and_without_count(llava, rsvqa):
    answers = ["Yes", "yes", "Rural.", "12", "yes", "three"]
    metrics = scripted(llava, read_benchmark(f"rsvqa:{rsvqa}"), answers)["metrics"]
    assert metrics["per_type"] == pytest.approx({"comparison": 0.0, "count": 1.0, "presence": 0.5, "rural_urban": 1.0})
    assert metrics["n_per_type"] == {"comparison": 1, "count": 2, "presence": 2, "rural_urban": 1}  # inactive left out
    every, no_count = metrics["overall_all_types"], metrics["overall_without_count_area"]
    assert every["types"] == ["comparison", "count", "presence", "rural_urban"]
    assert (every["oa"], every["aa"]) == pytest.approx((4 / 6, 2.5 / 4))
    assert no_count["types"] == ["comparison", "presence", "rural_urban"]
    assert (no_count["oa"], no_count["aa"], no_count["n"]) == pytest.approx((2 / 4, 1.5 / 3, 4))


# -- DIOR-RSVG --------------------------------------------------------------------------------------
DIOR_ANSWERS = ["vehicle {<10><20><30><50>|0}", "{<50><50><80><70>|0}", "I cannot see it"]


def test_dior_rsvg_acc_at_thresholds_miou_and_parse_failures(llava, dior):
    result = scripted(llava, read_benchmark(f"dior-rsvg:{dior}"), DIOR_ANSWERS)
    m = result["metrics"]
    assert result["counts"]["items"] == 3                                   # objects 0, 1 and 3 of test.txt
    assert (m["acc@0.5"], m["acc@0.7"]) == pytest.approx((2 / 3, 1 / 3))
    assert m["mean_iou"] == pytest.approx((1.0 + 600 / 900 + 0.0) / 3)
    assert m["parse_failures"] == 1
    assert [f["reason"] for f in result["failures"]] == ["no box parsed"]


def test_dior_rsvg_cumulative_iou_sums_intersections_over_unions(llava, dior):
    m = scripted(llava, read_benchmark(f"dior-rsvg:{dior}"), DIOR_ANSWERS)["metrics"]
    # grid areas: 600 / 600, 600 / 900, and the missed 50 x 50 box: 0 / 2500
    assert m["cum_iou_referring"] == pytest.approx((600 + 600) / (600 + 900 + 2500))
    assert (m["acc@0.6"], m["acc@0.8"], m["acc@0.9"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3))


def test_dior_rsvg_voc_plus_one_reads_boxes_as_inclusive_pixel_indices(llava, dior):
    bench = read_benchmark(f"dior-rsvg:{dior}", plus_one=True)
    result = scripted(llava, bench, DIOR_ANSWERS)
    assert bench.items[0].meta["pixel_box"] == [19.0, 39.0, 60.0, 100.0]
    first = 600 / (20.5 * 30.5)              # grid 10..30 x 20..50 inside 9.5..30 x 19.5..50
    second = 600 / (30.5 * 30.5)             # 50..80 x 50..70 inside 49.5..80 x 49.5..80
    assert result["metrics"]["mean_iou"] == pytest.approx((first + second + 0.0) / 3)
    assert "+1" in result["dataset"]["conventions"]["bndbox"]


def test_dior_rsvg_referring_prompt_is_the_geochat_refer_form(llava, dior):
    result = scripted(llava, read_benchmark(f"dior-rsvg:{dior}"), DIOR_ANSWERS)
    assert result["prompts"]["ref"]["example_rendered"].endswith(
        "[refer] Give me the location of <p> the vehicle on the left </p> ASSISTANT:")


# -- GeoChat-Bench ----------------------------------------------------------------------------------
def test_geochat_bench_rotated_iou_and_greedy_matching_of_several_boxes(llava, geochat):
    answers = ["plane {<40><40><60><60>|0}", "ship {<50><50><70><70>|0}{<0><0><10><20>|0}"]
    m = scripted(llava, read_benchmark(f"geochat-bench:{geochat}"), answers)["metrics"]
    octagon = 1 / math.sqrt(2)              # a square against itself turned 45 degrees
    assert m["per_type"]["ref"]["mean_iou"] == pytest.approx(octagon, abs=1e-6)
    assert m["per_type"]["grounding"]["mean_iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert (m["acc@0.5"], m["acc@0.7"], m["n_boxes"]) == pytest.approx((1.0, 2 / 3, 3))


def test_geochat_bench_reads_rotated_boxes_given_as_four_corners(tmp_path):
    from engine.grounding import box_corners

    corners = [list(p) for p in box_corners(40, 45, 60, 55, 30)]           # a 20 x 10 box turned 30 degrees
    (tmp_path / "bench.json").write_text(json.dumps([{"question_id": 7, "image": "x.png", "question": "the tank",
                                                      "type": "ref", "ground_truth": corners}]))
    (box,) = read_geochat_bench(tmp_path / "bench.json").items[0].boxes
    assert (box.x1, box.y1, box.x2, box.y2, box.angle) == pytest.approx((40, 45, 60, 55, 30))


# -- captions ---------------------------------------------------------------------------------------
def test_captions_equal_to_a_reference_score_bleu4_one(llava, captions):
    result = scripted(llava, read_benchmark(f"captions:{captions}"), [refs[0] for refs in CAPTIONS])
    assert result["counts"]["items"] == 3                                  # the train image is not evaluated
    assert result["metrics"]["bleu4"] == pytest.approx(1.0, abs=1e-6) and result["metrics"]["cider"] > 1.0


def test_unrelated_captions_score_near_zero(llava, captions):
    metrics = scripted(llava, read_benchmark(f"captions:{captions}"), ["snow", "snow on a mountain top", "zz"])["metrics"]
    assert metrics["bleu4"] < 1e-3 and metrics["cider"] < 0.1


# -- determinism, checksum, selection ---------------------------------------------------------------
def test_two_runs_give_identical_results_except_timing(llava, ucm):
    bench = read_benchmark(f"ucm:{ucm}")
    first, second = (evaluate_pipeline(llava, bench, max_new_tokens=6) for _ in range(2))
    first.pop("timing"), second.pop("timing")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_checksum_changes_when_a_file_read_changes(ucm):
    bench = read_benchmark(f"ucm:{ucm}")
    files = [it.image for it in bench.items]
    before = dataset_checksum(bench.root, files)
    assert dataset_checksum(bench.root, list(reversed(files))) == before          # order of reading is irrelevant
    save_image(files[3], seed=99)
    assert dataset_checksum(bench.root, files) != before


def test_n_items_are_spread_evenly_over_the_data_set():
    items = [BenchItem(str(i), Path(f"{i}.png"), "classify", "", ["c"], "c") for i in range(10)]
    assert [it.key for it in select_items(items, 4)] == ["0", "2", "5", "7"]
    assert len(select_items(items, None)) == len(select_items(items, 50)) == 10


# -- the embedded model ------------------------------------------------------------------------------
def test_embedded_model_evaluates_a_folder_per_class_set_of_synthetic_scenes(tmp_path, repo_root):
    from engine.data.scene_generator import generate_scene

    model = repo_root / "resources" / "model"
    if not (model / "config.json").is_file():
        pytest.skip("the embedded model is not built")
    rng = np.random.default_rng(7)
    for folder, cls in (("Airport", "airport"), ("Forest", "forest"), ("Farmland", "farmland")):
        for k in range(2):
            image = generate_scene(rng, cls, render_size=128).image
            (tmp_path / "AID" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / "AID" / folder / f"{cls}_{k}.png")
    result = evaluate_pipeline(load_pipeline(model, "cpu"), read_benchmark(f"aid:{tmp_path / 'AID'}"))
    print("embedded model on 6 synthetic AID-layout scenes:", result["metrics"])
    assert result["counts"]["items"] == 6 and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["prompts"]["classify"]["example_rendered"].startswith(
        "<image>\n[classify] Classify the image within one of the given classes: airport, bare land, ")
    assert result["model"]["backend"] == "rs_lvlm" and len(result["dataset"]["sha256"]) == 64


def test_synthetic_scenes_are_written_in_every_format_the_evaluator_reads(tmp_path):
    from engine.lab.synthetic_benchmarks import write_synthetic_benchmarks

    specs = write_synthetic_benchmarks(tmp_path, seed=3, n=16)          # four samples per task
    counts = {fmt: len(read_benchmark(spec).items) for fmt, spec in specs.items()}
    assert {counts[f] for f in ("scenes", "rsvqa", "geochat-bench", "captions")} == {4}
    assert 1 <= counts.get("dior-rsvg", 1) <= 4
    (item, *_) = read_benchmark(specs["geochat-bench"]).items
    assert item.boxes and not item.text.startswith("[")                 # the phrase, no task token


def test_items_whose_image_is_missing_are_counted_and_not_evaluated(llava, dior):
    (dior / "JPEGImages" / "00002.jpg").unlink()
    result = scripted(llava, read_benchmark(f"dior-rsvg:{dior}"), DIOR_ANSWERS[:2])
    assert result["counts"]["items"] == 2 and result["missing_images"] == ["00002#3"]


def test_unknown_format_is_refused_naming_the_formats(tmp_path):
    with pytest.raises(ValueError, match="dior-rsvg"):
        read_benchmark(f"sentinel2:{tmp_path}")


def test_engine_evaluate_with_dataset_prints_the_result_as_one_json_line(llava, ucm, capsys):
    from engine.cli import main

    code = main(["evaluate", "--model", str(llava.model_dir), "--dataset", f"ucm:{ucm}", "--n", "2",
                 "--max-new-tokens", "4", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["dataset"]["items_evaluated"] == 2 and result["model"]["backend"] == "llava"
