"""LoRA fine-tuning of a LLaVA folder on a mix of benchmark-format data (CPU, a few steps)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_dataset_eval import save_image, voc_xml, write_long_llava

from engine.backends import load_pipeline
from engine.data.benchmark_formats import read_benchmark
from engine.lab.dataset_eval import evaluate_pipeline
from engine.lab.finetune import finetune, memory_estimate


@pytest.fixture(scope="module")
def peft():
    """Fine-tuning needs peft (requirements); without it those tests skip before building anything."""
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("finetune-data")
    for c, folder in enumerate(("beach", "forest")):
        for k in range(2):
            save_image(root / "UCM" / folder / f"{k}.png", 10 * c + k)
    save_image(root / "DIOR" / "JPEGImages" / "1.jpg", 1, 200, "JPEG")
    voc_xml(root / "DIOR" / "Annotations" / "1.xml", "1.jpg", [("vehicle", (20, 40, 60, 100), "the vehicle"),
                                                              ("ship", (100, 100, 160, 160), "the ship")])
    (root / "DIOR" / "train.txt").write_text("0 1")
    return [{"dataset": f"ucm:{root / 'UCM'}", "weight": 1}, {"dataset": f"dior-rsvg:{root / 'DIOR'}", "weight": 1}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_long_llava(tmp_path_factory.mktemp("finetune-base") / "tiny-llava", init_range=0.3)


def config(base: Path, data: list[dict], out: Path, steps: int) -> dict:
    return {"base": str(base), "data": data, "out": str(out), "steps": steps, "batch_size": 4, "lr": 3e-2,
            "warmup_steps": 2, "log_every": 1, "save_every": 2, "device": "cpu",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


@pytest.fixture(scope="module")
def trained(peft, base, data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("finetune-run") / "run"
    return finetune(config(base, data, out, 24), progress=False), out


def test_loss_falls_during_a_short_cpu_run(trained):
    _, out = trained
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_the_merged_result_loads_and_grounds_what_it_was_trained_on(base, data, trained):
    dior = read_benchmark(data[1]["dataset"], "train")
    before = evaluate_pipeline(load_pipeline(base, "cpu"), dior)["metrics"]
    tuned = load_pipeline(trained[0]["model"], "cpu")
    after = evaluate_pipeline(tuned, dior)["metrics"]
    assert tuned.name == "tiny-llava-finetuned" and tuned.info()["backend"] == "llava"
    assert (before["mean_iou"], before["parse_failures"]) == (0.0, 2)
    assert after["mean_iou"] > 0.5 and after["parse_failures"] == 0


def test_a_rerun_resumes_from_the_last_checkpoint(peft, base, data, tmp_path):
    finetune(config(base, data, tmp_path / "run", 2), progress=False)
    summary = finetune(config(base, data, tmp_path / "run", 3), progress=False)
    assert summary["started_at"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


GEOCHAT_7B = {"text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "image_size": 504, "patch_size": 14}}


def test_memory_estimate_counts_a_7b_llava_and_fits_24_gb_only_with_gradient_checkpointing():
    lora = {"r": 64, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    with_gc = memory_estimate(GEOCHAT_7B, {"batch_size": 4, "gradient_checkpointing": True, "lora": lora})
    without = memory_estimate(GEOCHAT_7B, {"batch_size": 4, "gradient_checkpointing": False, "lora": lora})
    assert with_gc["parameters"] == pytest.approx(7.06e9, rel=0.01) and with_gc["sequence_tokens"] == 36 * 36 + 128
    lora_per_layer = 64 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert with_gc["trainable_parameters"] == 32 * lora_per_layer + (1024 * 4096 + 4096 * 4096)
    assert with_gc["total_gib"] < 22 < without["total_gib"]


def test_the_shipped_geochat_config_is_complete_and_fits_24_gb(repo_root):
    from engine.lab.finetune import load_config

    cfg = load_config(repo_root / "configs" / "finetune_geochat.json")
    assert memory_estimate(GEOCHAT_7B, cfg)["total_gib"] < 22 and cfg["gradient_checkpointing"]
