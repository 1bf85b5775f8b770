"""`python -m engine train --config CFG`: a config naming a base fine-tunes it, any other trains the embedded model."""
from __future__ import annotations

import json

from test_finetune import base, config, data, peft  # noqa: F401  (fixtures)

import engine.lab.finetune as finetune_module
import engine.lab.train as train_module
from engine.cli import main


def test_engine_train_with_a_base_config_runs_the_lora_finetuning(peft, base, data, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "finetune.json"
    cfg.write_text(json.dumps(config(base, data, tmp_path / "run", 2)))
    assert main(["train", "--config", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["model"] == str(tmp_path / "run" / "final")
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == "llava"
    assert len((tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()) == 2


def test_out_on_the_command_line_overrides_the_finetuning_configs_out(peft, base, data, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "finetune.json"
    cfg.write_text(json.dumps(config(base, data, tmp_path / "in-config", 1)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "given")]) == 0
    assert (tmp_path / "given" / "final" / "config.json").is_file() and not (tmp_path / "in-config").exists()


def test_engine_train_without_a_base_trains_the_embedded_model(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train_module, "train", lambda cfg, out, run, resume=True: calls.append((cfg, out)) or {})
    monkeypatch.setattr(finetune_module, "finetune", lambda *a, **k: calls.append("finetune"))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"preset": "tiny", "max_steps": 3}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "ckpt")]) == 0
    ((trained, out),) = calls
    assert isinstance(trained, train_module.TrainConfig) and trained.max_steps == 3 and out == tmp_path / "ckpt"
