"""The fused decode step computes the reference model's function: same logits, same tokens."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.model.fast_decode import FusedDecoder
from engine.backends.rs_lvlm import generate
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


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A small model over the real knowledge base, saved as a checkpoint the engine loads."""
    import numpy as np

    from engine.knowledge import DEFAULT_INDEX_DIR, KnowledgeBase
    from engine.model.checkpoint import save_checkpoint
    from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration
    from engine.model.tokenizer import build_tokenizer
    from model_helpers import small_config

    tokenizer = build_tokenizer(["an airport with airplanes.", "storage tank {<10><20><30><40>|0}"] * 10,
                                vocab_size=480)
    kb = KnowledgeBase.load(DEFAULT_INDEX_DIR)
    torch.manual_seed(4)
    model = RsLvlmForConditionalGeneration(small_config(vocab_size=len(tokenizer)),
                                           torch.from_numpy(np.asarray(kb.embeddings)),
                                           torch.as_tensor(np.asarray(kb.level_ids), dtype=torch.long)).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "model",
                           knowledge_index_dir=DEFAULT_INDEX_DIR)


def test_int8_precision_request_decodes_with_int8_on_the_cpu(checkpoint_dir):
    import numpy as np

    from engine.service import EngineService

    service = EngineService()
    pipeline = service.pipeline(str(checkpoint_dir), "cpu", "int8")
    assert pipeline.int8_decode and pipeline.info()["int8_decode"]
    assert next(pipeline.model.parameters()).dtype == torch.float32   # the prefill stays float32
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    answer = pipeline.answer([image], "caption", None, max_new_tokens=4)[0]
    assert answer.timing["new_tokens"] >= 1
    float32 = service.pipeline(str(checkpoint_dir), "cpu", "float32")
    assert float32 is pipeline and not float32.int8_decode     # same model, only the decode step differs


def test_int8_precision_is_refused_on_cuda(checkpoint_dir):
    from engine.errors import EngineError
    from engine.service import EngineService

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(EngineError, match="int8 precision is for the CPU"):
        EngineService().pipeline(str(checkpoint_dir), "cuda", "int8")


def test_fused_weights_are_reused_until_a_parameter_changes():
    model = small_model(seed=2).eval()
    first = FusedDecoder(model, batch=1, capacity=8)
    assert FusedDecoder(model, batch=1, capacity=8).layers is first.layers      # built once
    with torch.no_grad():
        model.language_model.layers[0].self_attn.q_proj.weight.mul_(2.0)        # e.g. a training step
    rebuilt = FusedDecoder(model, batch=1, capacity=8)
    assert rebuilt.layers is not first.layers
    assert torch.equal(rebuilt.layers[0].qkv.weight[:model.config.hidden_size],
                       model.language_model.layers[0].self_attn.q_proj.weight)
