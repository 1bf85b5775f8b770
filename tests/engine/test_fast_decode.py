"""The fused decode step computes the reference model's function: same logits, same tokens."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.model.fast_decode import FusedDecoder
from engine.model.generation import generate
from model_helpers import prompt_batch, small_model


def _inputs(model, lengths=(9, 6)):
    ids, mask = prompt_batch(model.config, list(lengths), seed=2)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(len(lengths), 3, 32, 32, generator=g)
    question = nn.functional.normalize(torch.randn(len(lengths), 384, generator=g), dim=-1)
    return pixels, ids, mask, question


def _sharpen(model):
    """Scale the LM head so that greedy argmax has no near-ties (random models have many)."""
    with torch.no_grad():
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        model.lm_head.weight.copy_(model.language_model.embed_tokens.weight * 20.0)
        model.lm_head.bias.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("experts", [True, False], ids=["experts", "plain-mlp"])
def test_fused_step_logits_match_the_reference_model(experts):
    model = small_model(seed=4, use_experts=experts).eval()
    pixels, ids, mask, question = _inputs(model)
    with torch.no_grad():
        out = model(pixels, ids, mask, question_embeds=question, use_cache=True, logits_to_keep=1)
        cache, spliced = out.past_key_values, out.attention_mask
        decoder = FusedDecoder(model, batch=2, capacity=spliced.shape[1] + 4)
        decoder.load_cache(cache)
        tokens = torch.tensor([17, 23])
        for alive in ([1, 1], [1, 0]):          # second step: row 1 has finished (masked column)
            spliced = torch.cat([spliced, torch.tensor(alive)[:, None]], dim=1)
            fused = decoder.step(tokens, spliced)
            ref = model(None, tokens[:, None], spliced, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = ref.past_key_values
            live = torch.tensor(alive).bool()   # a finished row's logits are never used
            torch.testing.assert_close(fused[live], ref.logits[live, -1], rtol=1e-4, atol=1e-4)
            tokens = ref.logits[:, -1].argmax(-1)


def test_fast_and_reference_generation_give_the_same_tokens():
    model = _sharpen(small_model(seed=3)).eval()
    pixels, ids, mask, question = _inputs(model)
    fast = generate(model, pixels, ids, mask, question, max_new_tokens=12, fast=True)
    reference = generate(model, pixels, ids, mask, question, max_new_tokens=12, fast=False)
    assert fast.sequences == reference.sequences
    assert all(len(s) == 12 for s in fast.sequences)


def test_grouped_query_attention_is_supported():
    model = small_model(seed=6, num_key_value_heads=2).eval()
    pixels, ids, mask, question = _inputs(model, lengths=(7,))
    fast = generate(model, pixels, ids, mask, question, max_new_tokens=6, fast=True)
    reference = generate(model, pixels, ids, mask, question, max_new_tokens=6, fast=False)
    assert fast.sequences == reference.sequences


def test_full_static_cache_is_refused():
    model = small_model(seed=1).eval()
    pixels, ids, mask, question = _inputs(model, lengths=(5,))
    with torch.no_grad():
        out = model(pixels, ids, mask, question_embeds=question, use_cache=True)
        decoder = FusedDecoder(model, batch=1, capacity=out.attention_mask.shape[1])
        decoder.load_cache(out.past_key_values)
        with pytest.raises(ValueError, match="full"):
            decoder.step(torch.tensor([3]), torch.cat([out.attention_mask, torch.ones(1, 1, dtype=torch.long)], 1))


def test_int8_decoding_stays_close_to_the_float_step():
    model = small_model(seed=4).eval()
    pixels, ids, mask, question = _inputs(model)
    with torch.no_grad():
        out = model(pixels, ids, mask, question_embeds=question, use_cache=True, logits_to_keep=1)
        spliced = torch.cat([out.attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        logits = {}
        for int8 in (False, True):
            decoder = FusedDecoder(model, batch=2, capacity=spliced.shape[1], int8=int8)
            decoder.load_cache(out.past_key_values)
            logits[int8] = decoder.step(torch.tensor([17, 23]), spliced)
    scale = logits[False].abs().max()
    assert not torch.equal(logits[True], logits[False])           # really another kernel
    assert (logits[True] - logits[False]).abs().max() < 0.05 * scale


def test_int8_decoding_is_refused_off_the_cpu_float32_path():
    model = small_model(seed=4).eval().to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        FusedDecoder(model, batch=1, capacity=8, int8=True)
