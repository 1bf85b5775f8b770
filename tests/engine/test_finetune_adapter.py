"""A fine-tune saved as a LoRA adapter folder: the engine loads base + adapter and answers as the merged save."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_finetune import base, config, data, peft  # noqa: F401  (fixtures)
from test_llava_backend import char_tokenizer, tiny_llava_config

from engine.backends import backend_for, load_pipeline
from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError
from engine.lab.finetune import finetune


@pytest.fixture(scope="module")
def saved(peft, base, data, tmp_path_factory) -> dict:  # noqa: F811
    """Three steps saved both ways: the adapter folder and the merged folder hold the same weights."""
    out = tmp_path_factory.mktemp("adapter-run") / "run"
    return finetune({**config(base, data, out, 3), "save": "both"}, progress=False)["saved"]


def copy_adapter(saved: dict, tmp_path: Path, **manifest) -> Path:
    folder = Path(shutil.copytree(saved["adapter"], tmp_path / "adapter"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rs_lvlm_adapter"].update(manifest)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_save_adapter_writes_peft_safetensors_the_projector_and_a_config_naming_the_base(saved, base):  # noqa: F811
    folder = Path(saved["adapter"])
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "projector.safetensors", "config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    manifest = json.loads((folder / "config.json").read_text())["rs_lvlm_adapter"]
    assert manifest["base"] == str(Path(base).resolve()) and manifest["format"] == "peft-lora"
    assert (folder / "adapter_model.safetensors").stat().st_size < 0.5 * (Path(base) / "model.safetensors").stat().st_size


def test_the_adapter_folder_gives_the_same_logits_and_greedy_answer_as_the_merged_save(saved, base):  # noqa: F811
    adapter, merged = load_pipeline(saved["adapter"], "cpu"), load_pipeline(saved["merged"], "cpu")
    untuned = load_pipeline(base, "cpu")
    assert adapter.name == merged.name == "tiny-llava-finetuned" and adapter.info()["adapter"]["path"] == saved["adapter"]
    image = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    from engine.model.image_processing import preprocess_images

    pixels = preprocess_images([image], adapter.image_size, adapter.image_mean, adapter.image_std, adapter.rescale)
    ids = torch.tensor([adapter.prompt_ids("[refer] Give me the location of <p> vehicle </p>")])
    with torch.no_grad():
        a = adapter.model(input_ids=ids, pixel_values=pixels).logits
        m = merged.model(input_ids=ids, pixel_values=pixels).logits
        b = untuned.model(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(a, m, atol=1e-5) and not torch.allclose(a, b, atol=1e-2)   # the adapter did apply
    texts = [p.answer([image], "ground", "vehicle", max_new_tokens=16)[0].text for p in (adapter, merged)]
    assert texts[0] == texts[1]


def test_engine_ask_with_an_adapter_folder_answers_like_the_merged_folder(saved, tmp_path, capsys):
    from geo_rasters import write_raster

    from engine.cli import main

    raster = write_raster(tmp_path / "utm.tif")
    left, top = raster.transform @ (0, 0)
    right, bottom = raster.transform @ (raster.width, raster.height)
    results = []
    for model in (saved["adapter"], saved["merged"]):
        assert main(["ask", "--raster", str(raster.path), "--bbox", str(left), str(bottom), str(right), str(top),
                     "--task", "vqa", "--question", "What is this?", "--model", model, "--device", "cpu"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["raw"] == results[1]["raw"] and results[0]["model"] == results[1]["model"]


def test_an_adapter_whose_base_is_missing_is_refused_as_no_model(saved, tmp_path):
    folder = copy_adapter(saved, tmp_path, base=str(tmp_path / "gone"))
    with pytest.raises(EngineError) as err:
        load_pipeline(folder, "cpu")
    assert err.value.code == NO_MODEL and "gone" in err.value.message and "rs_lvlm_adapter.base" in err.value.message


def test_an_adapter_that_does_not_fit_its_base_is_refused_as_bad_checkpoint(saved, tmp_path):
    from transformers import LlavaForConditionalGeneration

    tok = char_tokenizer()
    other_config = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"))
    other_config.text_config.hidden_size, other_config.text_config.intermediate_size = 48, 96
    other = tmp_path / "other-llava"
    LlavaForConditionalGeneration(other_config).save_pretrained(other)
    tok.save_pretrained(other)
    folder = copy_adapter(saved, tmp_path, base=str(other))
    assert backend_for(folder) == "llava"
    with pytest.raises(EngineError) as err:
        load_pipeline(folder, "cpu")
    assert err.value.code == BAD_CHECKPOINT and "does not fit the base" in err.value.message


def test_a_pickle_in_an_adapter_folder_is_refused_unread(saved, tmp_path):
    folder = copy_adapter(saved, tmp_path)
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(EngineError) as err:
        load_pipeline(folder, "cpu")
    assert err.value.code == BAD_CHECKPOINT and "adapter_model.bin" in err.value.message
