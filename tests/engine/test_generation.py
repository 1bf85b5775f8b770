"""Generation: KV cache equivalence, streaming, stop strings, cancellation, batching."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.backends.rs_lvlm import generate
from engine.model.tokenizer import build_tokenizer
from model_helpers import prompt_batch, small_model

CORPUS = ["a harbour with ships and storage tanks near the water.", "storage tank {<10><20><30><40>|0}",
          "an airport with airplanes on the runway.", "farmland fields in green and brown."] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=480)


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = small_model(seed=3, vocab_size=len(tokenizer)).eval()
    # A sharper random LM (fewer near-ties in argmax) that writes only tokens which decode to
    # text on their own, so that the streamed pieces are not all empty.
    head = nn.Linear(model.config.hidden_size, len(tokenizer))
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 20.0)
        texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]
        head.bias.copy_(torch.tensor([0.0 if t and "\ufffd" not in t else -1e4 for t in texts]))
    model.lm_head = head
    ids, mask = prompt_batch(model.config, [9, 6], seed=2)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    question = nn.functional.normalize(torch.randn(2, 384, generator=g), dim=-1)
    return model, pixels, ids, mask, question


def test_cached_and_uncached_greedy_generation_give_the_same_tokens(setup):
    model, pixels, ids, mask, question = setup
    cached = generate(model, pixels, ids, mask, question, max_new_tokens=10, use_cache=True)
    uncached = generate(model, pixels, ids, mask, question, max_new_tokens=10, use_cache=False)
    assert cached.sequences == uncached.sequences
    assert all(len(s) == 10 for s in cached.sequences) and cached.stopped_reason == "max_tokens"


def test_batch_of_two_equals_two_single_generations(setup):
    model, pixels, ids, mask, question = setup
    batched = generate(model, pixels, ids, mask, question, max_new_tokens=8)
    for row in range(2):
        keep = mask[row].bool()
        single = generate(model, pixels[row:row + 1], ids[row:row + 1, keep], None, question[row:row + 1],
                          max_new_tokens=8)
        assert single.sequences[0] == batched.sequences[row]
        for level, (scores, idx) in batched.retrieved.items():
            assert torch.equal(single.retrieved[level][1][0], idx[row])


def test_streaming_callback_sees_every_token_and_rebuilds_the_text(setup, tokenizer):
    model, pixels, ids, mask, question = setup
    pieces: dict[int, list[str]] = {0: [], 1: []}
    result = generate(model, pixels, ids, mask, question, max_new_tokens=12, tokenizer=tokenizer,
                      on_token=lambda row, piece: pieces[row].append(piece))
    for row in range(2):
        n_tokens = len([t for t in result.sequences[row] if t != tokenizer.eos_token_id])
        assert len(pieces[row]) == n_tokens
        assert "".join(pieces[row]) == result.texts[row]
        assert result.texts[row] == tokenizer.decode(result.sequences[row], skip_special_tokens=True)


def test_stop_string_ends_the_row_and_is_cut_from_the_text(setup, tokenizer):
    model, pixels, ids, mask, question = setup
    free = generate(model, pixels[:1], ids[:1], mask[:1], question[:1], max_new_tokens=16, tokenizer=tokenizer)
    text = free.texts[0]
    assert len(text) >= 6, text
    stop = text[3:6]
    pieces: list[str] = []
    stopped = generate(model, pixels[:1], ids[:1], mask[:1], question[:1], max_new_tokens=16, tokenizer=tokenizer,
                       stop_strings=[stop], on_token=lambda row, piece: pieces.append(piece))
    assert stopped.stopped_reason == "stop_string"
    assert stopped.texts[0] == text[: text.find(stop)]
    assert "".join(pieces) == stopped.texts[0]
    assert len(stopped.sequences[0]) < len(free.sequences[0])


def test_should_stop_cancels_between_tokens(setup):
    model, pixels, ids, mask, question = setup
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 4                  # before prefill, then after tokens 1, 2, 3

    result = generate(model, pixels, ids, mask, question, max_new_tokens=20, should_stop=should_stop)
    assert result.stopped_reason == "cancelled" and result.stopped_reasons == ["cancelled"] * 2
    assert [len(s) for s in result.sequences] == [3, 3]
    early = generate(model, pixels, ids, mask, question, max_new_tokens=20, should_stop=lambda: True)
    assert early.sequences == [[], []] and early.stopped_reason == "cancelled"


def test_end_of_sequence_token_stops_generation():
    model = small_model().eval()
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[model.config.eos_token_id] = 1.0
    model.lm_head = head
    ids, mask = prompt_batch(model.config, [5])
    result = generate(model, torch.randn(1, 3, 32, 32), ids, mask, max_new_tokens=5)
    assert result.sequences == [[model.config.eos_token_id]] and result.stopped_reason == "eos"


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(setup):
    model, pixels, ids, mask, question = setup
    runs = [generate(model, pixels, ids, mask, question, max_new_tokens=6, do_sample=True, temperature=1.5,
                     generator=torch.Generator().manual_seed(7)).sequences for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = generate(model, pixels, ids, mask, question, max_new_tokens=6).sequences
    nucleus = generate(model, pixels, ids, mask, question, max_new_tokens=6, do_sample=True, top_p=1e-6,
                       generator=torch.Generator().manual_seed(7)).sequences
    assert nucleus == greedy


def test_recorded_logprobs_equal_a_teacher_forced_pass(setup):
    model, pixels, ids, mask, question = setup
    result = generate(model, pixels[:1], ids[:1], mask[:1], question[:1], max_new_tokens=6)
    gen = torch.tensor([result.sequences[0]])
    full_ids = torch.cat([ids[:1], gen], dim=1)
    full_mask = torch.cat([mask[:1], torch.ones_like(gen)], dim=1)
    with torch.no_grad():
        logits = model(pixels[:1], full_ids, full_mask, question_embeds=question[:1]).logits[0, -gen.shape[1] - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, gen[0][:, None])[:, 0]
    assert len(result.logprobs[0]) == len(result.sequences[0])
    torch.testing.assert_close(torch.tensor(result.logprobs[0]), expected, rtol=1e-4, atol=1e-4)
