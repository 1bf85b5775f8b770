"""Checkpoints: identical logits after a round trip; pickles, truncation, mismatches refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError
from engine.backends.base import checkpoint_errors
from engine.model.checkpoint import load_checkpoint as _load_checkpoint
from engine.model.checkpoint import save_checkpoint
from engine.model.tokenizer import build_tokenizer
from model_helpers import prompt_batch, small_model


def load_checkpoint(*args, **kwargs):
    """Load as the engine does: the model's CheckpointError becomes the engine's coded error."""
    with checkpoint_errors():
        return _load_checkpoint(*args, **kwargs)

CORPUS = ["an airport with airplanes.", "storage tank {<10><20><30><40>|0}"] * 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = build_tokenizer(CORPUS, vocab_size=480)
    model = small_model(seed=4, vocab_size=len(tokenizer)).eval()
    with torch.no_grad():
        model.sam.fusion[0].attn_gate.fill_(0.7)          # non-trivial SAM so it matters
    out = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "model")
    return model, tokenizer, out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _logits(model):
    torch.manual_seed(0)
    ids, mask = prompt_batch(model.config, [7, 5])
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32), ids, mask, question_embeds=torch.randn(2, 384)).logits


def test_save_load_round_trip_gives_identical_logits(saved):
    model, tokenizer, out = saved
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "knowledge"}
    loaded = load_checkpoint(out)
    assert loaded.config == model.config
    assert len(loaded.tokenizer) == len(tokenizer)
    assert torch.equal(loaded.model.sam.knowledge_embeddings, model.sam.knowledge_embeddings)
    assert torch.equal(loaded.model.sam.knowledge_levels, model.sam.knowledge_levels)
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert loaded.model.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_missing_directory_is_no_model_with_instructions(tmp_path):
    with pytest.raises(EngineError) as err:
        load_checkpoint(tmp_path / "nowhere")
    assert err.value.code == NO_MODEL
    assert str(tmp_path / "nowhere") in err.value.message and "make model" in err.value.message


def test_pickle_file_is_refused(saved, tmp_path):
    ckpt = _copy(saved[2], tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(EngineError) as err:
        load_checkpoint(ckpt)
    assert err.value.code == BAD_CHECKPOINT
    assert "pytorch_model.bin" in err.value.message and "never loaded" in err.value.message
    assert "safetensors" in err.value.message


def test_truncated_safetensors_is_refused_with_a_clear_message(saved, tmp_path):
    ckpt = _copy(saved[2], tmp_path / "m")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError) as err:
        load_checkpoint(ckpt)
    assert err.value.code == BAD_CHECKPOINT
    assert "model.safetensors" in err.value.message and "truncated or corrupt" in err.value.message


def test_mis_shaped_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    ckpt = _copy(saved[2], tmp_path / "m")
    state = load_file(ckpt / "model.safetensors")
    state["projector.level_embedding.weight"] = torch.zeros(3, 7)
    del state["vision.pre_layrnorm.bias"]
    state["surprise.weight"] = torch.zeros(2)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(EngineError) as err:
        load_checkpoint(ckpt)
    msg = err.value.message
    assert err.value.code == BAD_CHECKPOINT
    assert "projector.level_embedding.weight (file (3, 7), model (3, 32))" in msg
    assert "vision.pre_layrnorm.bias" in msg and "surprise.weight" in msg


def test_config_that_does_not_match_the_weights_is_refused(saved, tmp_path):
    ckpt = _copy(saved[2], tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="missing tensors: language_model.layers.2"):
        load_checkpoint(ckpt)


def test_load_in_bfloat16(saved):
    loaded = load_checkpoint(saved[2], dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.sam.knowledge_embeddings.dtype == torch.float32
    assert loaded.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    logits = _logits(loaded.model)
    assert torch.isfinite(logits.float()).all()


def test_knowledge_index_dir_is_copied_and_levels_read_from_its_entries(saved, tmp_path):
    import numpy as np

    model, tokenizer, _ = saved
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    np.save(index_dir / "embeddings.npy", model.sam.knowledge_embeddings.numpy())
    names = ("object", "region", "scene")
    lines = [json.dumps({"id": f"e{i}", "level": names[int(lv)]}) for i, lv in enumerate(model.sam.knowledge_levels)]
    (index_dir / "entries.jsonl").write_text("\n".join(lines) + "\n")
    (index_dir / "meta.json").write_text("{}")
    out = save_checkpoint(model, tokenizer, tmp_path / "m", knowledge_index_dir=index_dir)
    assert {p.name for p in (out / "knowledge").iterdir()} == {"embeddings.npy", "entries.jsonl", "meta.json"}
    loaded = load_checkpoint(out)
    assert loaded.knowledge_dir == out / "knowledge"
    assert torch.equal(loaded.model.sam.knowledge_levels, model.sam.knowledge_levels)
