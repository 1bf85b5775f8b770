"""The seed's SAM, level projectors and semantic experts built around a LLaVA base and fine-tuned with a LoRA LM."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from test_finetune import base, config, data, peft  # noqa: F401  (fixtures)

from engine.backends import load_pipeline
from engine.lab.finetune import finetune, load_config

STEPS = 8


@pytest.fixture(scope="module")
def seed_run(peft, base, data, tmp_path_factory) -> tuple[dict, Path]:  # noqa: F811
    out = tmp_path_factory.mktemp("seed-run") / "run"
    cfg = {**config(base, data, out, STEPS), "seed_components": {"expert_intermediate_size": 16}}
    return finetune(cfg, progress=False), out


def test_loss_falls_while_the_seed_components_train_on_a_llava_base(seed_run):
    _, out = seed_run
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and sum(losses[-2:]) / 2 < 0.6 * sum(losses[:2]) / 2


def test_sam_level_projectors_experts_and_lora_all_train_and_sam_gates_open(seed_run):
    summary, _ = seed_run
    assert all(summary["trained"][part] > 0 for part in ("lora", "sam", "projector", "experts"))
    with safe_open(str(Path(summary["model"]) / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        gates = [float(f.get_tensor(k).abs().max()) for k in names if k.endswith("attn_gate")]
        down = [float(f.get_tensor(k).abs().max()) for k in names if ".mlp.experts." in k and k.endswith("down_proj.weight")]
    assert len(gates) == 3 and min(gates) > 0            # closed (zero) at the start: the LM loss opened them
    assert down and min(down) > 0                        # level experts start with a zero down projection
    assert not [k for k in names if "lora_" in k]        # LoRA merged into the weights


def test_the_saved_seed_model_answers_through_the_engine_with_retrieved_entries(seed_run):
    summary, _ = seed_run
    folder = Path(summary["model"])
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    pipeline = load_pipeline(folder, "cpu")
    info = pipeline.info()
    assert info["use_sam"] and info["use_experts"] and pipeline.name == "tiny-llava-seed"
    image = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    (answer,) = pipeline.answer([image], "classify", None, max_new_tokens=8)
    assert answer.stopped_reason in ("eos", "max_tokens", "stop_string") and answer.timing["new_tokens"] > 0
    assert {r["level"] for r in answer.retrieved} == {"object", "region", "scene"}


def test_seed_components_refuse_an_adapter_save(base, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="seed_components"):
        load_config({**config(base, data, tmp_path, 1), "seed_components": True, "save": "adapter"})
