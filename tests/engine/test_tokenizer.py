"""Tokenizer: fixed special ids, exact round trip of box text, prompts with one <image>."""
from __future__ import annotations

import pytest

from engine.model.prompts import build_prompt, encode_example, encode_prompt, pad_batch
from engine.model.tokenizer import (
    GROUNDING_TOKENS, OBJECT_TOKENS, TASK_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer,
)

CORPUS = [
    "an airport with two airplanes parked near the terminal.",
    "storage tank {<10><20><30><40>|0}",
    "what is the colour of the roof? red",
    "a harbour with several ships {<5><6><7><8>|30}{<50><50><60><60>|-45}",
] * 20
VOCAB = 480   # room for the byte alphabet, the grid, task and object reference tokens and a few merges


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=VOCAB)


def test_special_token_ids_are_fixed(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert ids == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    assert len(tokenizer) <= VOCAB


@pytest.mark.parametrize("text", [
    "storage tank {<10><20><30><40>|0}",
    "airplane {<1><2><3><4>|-45}{<50><50><60><60>|0}, ship {<0><0><100><100>}",
    "no boxes here, just a field of crops.",
])
def test_box_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_grid_task_and_object_reference_tokens_are_single_tokens(tokenizer):
    for token in GROUNDING_TOKENS + TASK_TOKENS + OBJECT_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token


def test_save_and_load_give_the_same_encoding(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    text = "<image>\n[grounding] where are the tanks?\n storage tank {<10><20><30><40>|0}"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert len(loaded) == len(tokenizer)


def test_prompt_has_one_image_token_and_loss_only_on_the_answer(tokenizer):
    for task in ("caption", "vqa", "ground", "classify"):
        assert build_prompt(task, None).count("<image>") == 1
    assert build_prompt("vqa", "what <image> is this?").count("<image>") == 1
    ids, labels = encode_example(tokenizer, "ground", "where are the tanks?", "storage tank {<10><20><30><40>|0}")
    prompt = encode_prompt(tokenizer, "ground", "where are the tanks?")
    assert ids[: len(prompt)] == prompt and ids[0] == tokenizer.bos_token_id
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt):-1]) == "storage tank {<10><20><30><40>|0}"
    with pytest.raises(ValueError):
        build_prompt("translate", None)


def test_pad_batch_pads_on_the_left():
    ids, mask, labels = pad_batch([[5, 6, 7], [8]], 0, [[-100, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert labels.tolist() == [[-100, 6, 7], [-100, -100, 8]]
