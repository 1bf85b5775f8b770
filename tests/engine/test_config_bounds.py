"""A checkpoint's config.json with absurd sizes is refused, with its figures, before any allocation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.backends import load_pipeline, read_config
from engine.errors import BAD_CHECKPOINT, EngineError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "resources" / "model" / "config.json"
TINY = {"model_type": "rs_lvlm", "image_size": 128, "patch_size": 16, "hidden_size": 256,
        "num_hidden_layers": 4, "intermediate_size": 640, "num_attention_heads": 8, "vocab_size": 1997,
        "vision_num_layers": 4, "vision_hidden_size": 192, "object_layer": 2}


def folder_with(tmp_path: Path, config) -> Path:
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


def refusal(tmp_path: Path, config) -> str:
    with pytest.raises(EngineError) as exc:
        read_config(folder_with(tmp_path, config))
    assert exc.value.code == BAD_CHECKPOINT
    return exc.value.message


@pytest.mark.parametrize("key, value, figure", [
    ("image_size", 96000, "96,000"), ("num_hidden_layers", 10 ** 6, "1,000,000"),
    ("hidden_size", 10 ** 7, "10,000,000"), ("vocab_size", 10 ** 9, "1,000,000,000"),
    ("intermediate_size", 10 ** 8, "100,000,000"), ("num_attention_heads", 100000, "100,000"),
    ("max_position_embeddings", 2 ** 40, "1,099,511,627,776"), ("vision_num_layers", 5000, "5,000"),
    ("patch_size", 0, "0"), ("num_channels", 1000, "1,000")])
def test_an_absurd_size_is_refused_with_its_figure(tmp_path, key, value, figure):
    message = refusal(tmp_path, {**TINY, key: value})
    assert key in message and figure in message


def test_a_size_nested_in_a_sub_config_is_checked(tmp_path):
    message = refusal(tmp_path, {"model_type": "llava", "text_config": {"num_hidden_layers": 10 ** 6}})
    assert "text_config.num_hidden_layers" in message


@pytest.mark.parametrize("value", [True, 12.5, "many", 1e300, [1, 2, 10 ** 9]])
def test_a_size_that_is_not_a_sane_whole_number_is_refused(tmp_path, value):
    refusal(tmp_path, {**TINY, "hidden_size": value})


def test_plausible_sizes_that_multiply_out_to_an_absurd_model_are_refused(tmp_path):
    message = refusal(tmp_path, {**TINY, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 512})
    assert "parameters" in message


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"a string"', "null", "42", "{not json", "[" * 100000])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, text):
    refusal(tmp_path, text)


def test_a_huge_config_file_is_refused_unread(tmp_path):
    assert "bytes" in refusal(tmp_path, '{"pad": "' + "x" * (5 * 1024 * 1024) + '"}')


def test_a_negative_layer_index_as_llava_uses_is_accepted(tmp_path):
    assert read_config(folder_with(tmp_path, {**TINY, "vision_feature_layer": -2}))["vision_feature_layer"] == -2


def test_the_shipped_config_is_within_bounds():
    if not SHIPPED.is_file():
        pytest.skip("no shipped model yet")
    assert read_config(SHIPPED.parent)["model_type"] == "rs_lvlm"


def test_loading_a_checkpoint_with_absurd_sizes_fails_before_anything_is_built(tmp_path):
    folder_with(tmp_path, {**TINY, "image_size": 96000})
    with pytest.raises(EngineError) as exc:
        load_pipeline(tmp_path)
    assert exc.value.code == BAD_CHECKPOINT and "96,000" in exc.value.message
