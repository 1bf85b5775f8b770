"""Full fine-tuning of one of our RS-LVLM checkpoints (object-centric, tiny) on a DIOR-RSVG + scene folder mix (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_finetune import data  # noqa: F401  (fixture: a two-object DIOR-RSVG and a two-class scene folder)

from engine.backends import load_pipeline
from engine.data.objects import OBJECT_CLASSES
from engine.lab.finetune import finetune, load_config

STEPS = 16
CORPUS = ["[refer] give the location of the vehicle. vehicle {<10><20><30><50>|0}",
          "[classify] what type of scene is this? beach forest airport ship storage tank"] * 10


@pytest.fixture(scope="module")
def own_base(tmp_path_factory) -> Path:
    """A random object-centric RS-LVLM over the shipped knowledge index, saved as the engine saves one."""
    from model_helpers import small_object_config

    from engine.knowledge import DEFAULT_INDEX_DIR, KnowledgeBase
    from engine.model.checkpoint import save_checkpoint
    from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration
    from engine.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(CORPUS, vocab_size=480)
    kb = KnowledgeBase.load(DEFAULT_INDEX_DIR)
    config = small_object_config(vocab_size=len(tokenizer), object_classes=OBJECT_CLASSES, name="tiny-own",
                                 object_token_start=tokenizer.convert_tokens_to_ids("<obj0>"),
                                 grid_token_start=tokenizer.convert_tokens_to_ids("<0>"))
    torch.manual_seed(3)
    model = RsLvlmForConditionalGeneration(config, torch.from_numpy(np.asarray(kb.embeddings)),
                                           torch.as_tensor(np.asarray(kb.level_ids), dtype=torch.long)).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("own-base") / "tiny-own",
                           knowledge_index_dir=DEFAULT_INDEX_DIR)


def own_config(base: Path, data: list[dict], out: Path, steps: int, **extra) -> dict:  # noqa: F811
    return {"base": str(base), "data": data, "out": str(out), "steps": steps, "batch_size": 4, "lr": 1e-2,
            "warmup_steps": 2, "log_every": 1, "save_every": 2, "device": "cpu", **extra}


@pytest.fixture(scope="module")
def tuned(own_base, data, tmp_path_factory) -> tuple[dict, Path]:  # noqa: F811
    out = tmp_path_factory.mktemp("own-run") / "run"
    return finetune(own_config(own_base, data, out, STEPS), progress=False), out


def changed(a: dict, b: dict, part: str) -> list[str]:
    return [k for k in a if part in k and not torch.equal(a[k], b[k])]


def test_loss_falls_in_a_full_finetune_of_our_checkpoint(tuned):
    summary, out = tuned
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    assert summary["precision"] == "float32" and summary["train_detector"] is False


def test_the_final_folder_reloads_and_answers_a_grounding_question_through_the_engine(tuned):
    summary, _ = tuned
    folder = Path(summary["model"])
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    pipeline = load_pipeline(folder, "cpu")
    assert pipeline.name == "tiny-own-finetuned" and type(pipeline).__name__ == "RsLvlmPipeline"
    image = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    (answer,) = pipeline.answer([image], "ground", "[refer] Give the location of the vehicle.", max_new_tokens=8)
    assert answer.timing["new_tokens"] > 0 and {r["level"] for r in answer.retrieved} == {"object", "region", "scene"}


def test_the_frozen_detector_is_unchanged_while_lm_sam_projectors_and_experts_train(own_base, tuned):
    before = load_file(str(own_base / "model.safetensors"))
    after = load_file(str(Path(tuned[0]["model"]) / "model.safetensors"))
    assert not changed(before, after, "vision.detector.")          # weights and normalisation statistics
    for part in ("language_model.layers.", "sam.", "projector.", ".mlp.experts.", ".mlp.router.", "vision.object_"):
        assert changed(before, after, part), part


def test_train_detector_trains_the_detector_on_the_datas_boxes(own_base, data, tmp_path):  # noqa: F811
    summary = finetune(own_config(own_base, data, tmp_path / "run", 2, train_detector=True), progress=False)
    before = load_file(str(own_base / "model.safetensors"))
    after = load_file(str(Path(summary["model"]) / "model.safetensors"))
    assert summary["detector_annotated_images"] == 1                # the DIOR image; scene folders have no boxes
    assert changed(before, after, "vision.detector.") and changed(before, after, "running_mean")
    assert all(bool(torch.isfinite(v).all()) for v in after.values() if v.is_floating_point())


def test_a_rerun_resumes_from_the_saved_step(own_base, data, tmp_path):  # noqa: F811
    finetune(own_config(own_base, data, tmp_path / "run", 2), progress=False)
    saved = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in saved.iterdir()) == ["state.json", "trainable.safetensors"]
    summary = finetune(own_config(own_base, data, tmp_path / "run", 3), progress=False)
    assert summary["started_at"] == 2 and json.loads((saved / "state.json").read_text())["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_engine_train_with_our_checkpoint_as_base_runs_the_full_finetune(own_base, data, tmp_path, capsys):  # noqa: F811
    from engine.cli import main

    cfg = tmp_path / "finetune.json"
    cfg.write_text(json.dumps(own_config(own_base, data, tmp_path / "run", 1)))
    assert main(["train", "--config", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == str(tmp_path / "run" / "final") and summary["steps"] == 1
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == "rs_lvlm"


def test_an_image_without_boxes_adds_nothing_to_the_detection_loss():
    from model_helpers import small_object_config

    from engine.lab.finetune_own import ignore_unannotated
    from engine.model.detector import CenterNetDetector, DetectorOutput, build_detection_targets, detection_loss

    config = small_object_config()
    objects = [torch.tensor([[0.1, 0.1, 0.4, 0.5, 3, 2, 1]]), torch.zeros((0, 7))]
    both = ignore_unannotated(build_detection_targets(objects, None, config), [True, False])
    alone = build_detection_targets(objects[:1], None, config)
    torch.manual_seed(0)
    with torch.no_grad():
        raw = CenterNetDetector(config).eval()(torch.randn(2, 3, 32, 32))
    first = DetectorOutput(*(t[:1] for t in raw))
    assert float(detection_loss(raw, both)) == pytest.approx(float(detection_loss(first, alone)), rel=1e-5)


def test_boxes_without_colour_or_size_train_the_heatmap_and_keep_the_loss_finite():
    from model_helpers import small_object_config

    from engine.lab.finetune_own import ignore_unannotated
    from engine.model.detector import CenterNetDetector, build_detection_targets, detection_loss

    config = small_object_config()
    targets = build_detection_targets([torch.tensor([[0.1, 0.1, 0.4, 0.5, 3, -1, -1]])], None, config)
    with torch.no_grad():
        raw = CenterNetDetector(config).eval()(torch.randn(1, 3, 32, 32))
    fit = ignore_unannotated(targets, [True])
    assert torch.isfinite(detection_loss(raw, fit)) and float(fit.heatmap.max()) == 1.0


def test_grounding_boxes_follow_the_order_the_answer_writes_them(own_base):
    from engine.data.instructions import Sample
    from engine.grounding import GridBox, parse_boxes
    from engine.knowledge import KnowledgeBase
    from engine.lab.finetune_own import training_sample

    boxes = [GridBox(1, 1, 9, 9, 0, "vehicle"), GridBox(50, 50, 60, 60, 0, "ship"), GridBox(20, 20, 30, 30, 0, "car")]
    answer = "vehicle {<1><1><9><9>|0}{<20><20><30><30>|0} and ship {<50><50><60><60>|0}"
    sample = Sample(np.zeros((32, 32, 3), np.uint8), "ground", "[grounding] vehicles and ships", answer, "ground",
                    {"scene": [], "object": ["vehicle", "not an entry"], "region": []}, boxes=boxes)
    fit = training_sample(sample, KnowledgeBase.load(own_base / "knowledge"))
    assert [(b.x1, b.label) for b in fit.boxes] == [(1, "vehicle"), (20, "car"), (50, "ship")]
    assert [b.x1 for b in parse_boxes(answer)] == [1, 20, 50]
    assert fit.knowledge_targets["object"] == ["vehicle"] and "objects" not in fit.meta


def test_lora_options_are_refused_for_our_checkpoint(own_base, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="RS-LVLM checkpoint"):
        load_config(own_config(own_base, data, tmp_path, 1, lora={"r": 4}))
    assert load_config({"base": str(own_base), "data": data, "out": str(tmp_path)})["lr"] == 1e-4
