"""LoRA fine-tuning of a LLaVA folder on a mix of benchmark-format data (CPU, a few steps)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_dataset_eval import save_image, voc_xml, write_long_llava

pytest.importorskip("peft")

from engine.backends import load_pipeline  # noqa: E402
from engine.data.benchmark_formats import read_benchmark  # noqa: E402
from engine.lab.dataset_eval import evaluate_pipeline  # noqa: E402
from engine.lab.finetune import finetune  # noqa: E402


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
def trained(base, data, tmp_path_factory) -> tuple[dict, Path]:
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


def test_a_rerun_resumes_from_the_last_checkpoint(base, data, tmp_path):
    finetune(config(base, data, tmp_path / "run", 2), progress=False)
    summary = finetune(config(base, data, tmp_path / "run", 3), progress=False)
    assert summary["started_at"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
