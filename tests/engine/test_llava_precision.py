"""The LLaVA backend's decode paths and CPU precisions: the fused static-cache step gives
transformers' own greedy tokens, bfloat16 and weight-only int8 load and answer on the CPU."""
from __future__ import annotations

import pytest
import torch

from engine.backends import load_pipeline
from engine.backends.int8_cpu import int8_linear_count
from test_llava_backend import TEXT, chip, write_tiny_llava



@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava-precision") / "tiny-llava", seed=3)


def _greedy_reference(pipeline, ids: list[int], pixel_values: torch.Tensor, n: int) -> list[int]:
    """transformers' generate on the same weights, never choosing what the pipeline bans."""
    out = pipeline.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, suppress_tokens=pipeline._banned.tolist())
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("question", ["airplanes", "How many ships are in the harbour?"])
def test_fused_decode_gives_the_tokens_of_transformers_generate(tiny_llava, question):
    from engine.backends.llava import build_instruction
    from engine.model.image_processing import preprocess_images

    pipeline = load_pipeline(tiny_llava, "cpu")
    assert pipeline.fused_decode and TEXT["num_key_value_heads"] < TEXT["num_attention_heads"]   # GQA
    pipeline.eos_ids = set()                       # compare a fixed number of tokens
    instruction, _ = build_instruction("vqa", question)
    ids = pipeline.prompt_ids(instruction)
    pixels = preprocess_images([chip()], pipeline.image_size, pipeline.image_mean, pipeline.image_std)
    answer = pipeline.answer([chip()], "vqa", question, max_new_tokens=12)[0]
    reference = _greedy_reference(pipeline, ids, pixels, 12)
    # The tokenizer is character-level: the same text is the same tokens.
    assert pipeline.tokenizer.decode(reference, skip_special_tokens=True).strip() == answer.text
    assert answer.timing["new_tokens"] == 12


def test_fused_and_module_by_module_decode_agree(tiny_llava):
    fused = load_pipeline(tiny_llava, "cpu")
    plain = load_pipeline(tiny_llava, "cpu")
    plain.fused_decode = False
    for p in (fused, plain):
        p.eos_ids = set()
    a = fused.answer([chip(), chip(7)], "vqa", "What is this?", max_new_tokens=10)
    b = plain.answer([chip(), chip(7)], "vqa", "What is this?", max_new_tokens=10)
    assert [x.text for x in a] == [x.text for x in b]


def test_a_large_language_model_decodes_on_its_own_modules_with_the_same_tokens(tiny_llava, monkeypatch):
    """Above FUSED_COPY_LIMIT_BYTES the fused step holds the model's own projections (a 7B would
    otherwise carry a second 9 GB copy of q/k/v and gate/up); the tokens stay the fused copies'."""
    import engine.backends.llava as llava
    from engine.model.fast_decode import ModuleLayer

    fused = load_pipeline(tiny_llava, "cpu")
    fused.eos_ids = set()
    a = fused.answer([chip(), chip(7)], "vqa", "What is this?", max_new_tokens=10)
    monkeypatch.setattr(llava, "FUSED_COPY_LIMIT_BYTES", 0)
    shared = load_pipeline(tiny_llava, "cpu")
    shared.eos_ids = set()
    decoder = shared._fused_decoder(1, 8)
    assert all(isinstance(layer, ModuleLayer) for layer in decoder.layers)
    own = {id(m) for layer in shared.model.model.language_model.layers for m in layer.modules()}
    assert all(id(m) in own for layer in decoder.layers for m in layer.matrices())
    b = shared.answer([chip(), chip(7)], "vqa", "What is this?", max_new_tokens=10)
    assert [x.text for x in a] == [x.text for x in b]


def test_bfloat16_loads_on_the_cpu_with_half_the_weight_bytes(tiny_llava):
    pipeline = load_pipeline(tiny_llava, "cpu", dtype="bfloat16")
    assert pipeline.info()["dtype"] == "bfloat16"
    assert next(pipeline.model.parameters()).dtype == torch.bfloat16
    assert pipeline.answer([chip()], "caption", None, max_new_tokens=4)[0].stopped_reason in ("eos", "max_tokens")


def test_int8_language_model_answers_close_to_float32(tiny_llava):
    full = load_pipeline(tiny_llava, "cpu")
    int8 = load_pipeline(tiny_llava, "cpu", dtype="int8")
    info = int8.info()
    assert info["dtype"] == "int8" and int8.fused_decode
    assert int8_linear_count(int8.model.model.language_model) == TEXT["num_hidden_layers"] * 7
    assert info["memory"]["precision"] == "int8" and info["memory"]["load_peak"]["precision"] == "bfloat16"
    from engine.backends.llava import build_instruction
    from engine.model.image_processing import preprocess_images

    ids = torch.tensor([full.prompt_ids(build_instruction("vqa", "What is this?")[0])])
    pixels = preprocess_images([chip()], full.image_size, full.image_mean, full.image_std)
    with torch.inference_mode():
        reference = full.model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        quantised = int8.model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(reference, quantised, dim=0) > 0.99
    assert int8.answer([chip()], "vqa", "What is this?", max_new_tokens=6)[0].timing["new_tokens"] >= 1


def test_int8_fused_decode_gives_the_tokens_of_the_int8_module_by_module_step(tiny_llava):
    fused = load_pipeline(tiny_llava, "cpu", dtype="int8")
    plain = load_pipeline(tiny_llava, "cpu", dtype="int8")
    plain.fused_decode = False
    for p in (fused, plain):
        p.eos_ids = set()                          # compare a fixed number of tokens
    images = [chip(), chip(7)]
    a = fused.answer(images, "vqa", "What is this?", max_new_tokens=10)
    b = plain.answer(images, "vqa", "What is this?", max_new_tokens=10)
    assert [x.text for x in a] == [x.text for x in b] and a[0].timing["new_tokens"] == 2 * 10
    for x, y in zip(a, b):
        assert x.text_score == pytest.approx(y.text_score, rel=1e-3)
    # Step by step from one prefill: the same logits as transformers' step on the same int8 modules.
    from engine.backends.llava import build_instruction
    from engine.model.image_processing import preprocess_images

    ids = torch.tensor([fused.prompt_ids(build_instruction("vqa", "What is this?")[0])])
    pixels = preprocess_images([chip()], fused.image_size, fused.image_mean, fused.image_std)
    with torch.inference_mode():
        out = fused.model(input_ids=ids, pixel_values=pixels, use_cache=True)
        decoder = fused._fused_decoder(1, ids.shape[1] + 4)
        decoder.load_cache(out.past_key_values)
        past, mask, token = out.past_key_values, torch.ones_like(ids), out.logits[:, -1].argmax(-1)
        for _ in range(4):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ours = decoder.step(token, mask)
            step = fused.model(input_ids=token[:, None], past_key_values=past, attention_mask=mask, use_cache=True)
            past, reference = step.past_key_values, step.logits[:, -1]
            assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)
            token = reference.argmax(-1)


def test_the_int8_decode_step_runs_the_models_own_per_channel_int8_matrices(tiny_llava):
    from engine.backends.int8_cpu import Int8FusedDecoder

    pipeline = load_pipeline(tiny_llava, "cpu", dtype="int8")
    language_model = pipeline.model.model.language_model
    decoder = pipeline._fused_decoder(2, 64)
    assert isinstance(decoder, Int8FusedDecoder)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    ours = [m for layer in decoder.layers for m in layer.matrices()]
    theirs = [m for m in language_model.layers.modules() if isinstance(m, dynamic)]
    assert len(ours) == TEXT["num_hidden_layers"] * 7 and {id(m) for m in ours} == {id(m) for m in theirs}
    assert all(m.weight().qscheme() == torch.per_channel_affine for m in ours)     # one scale per output row
    # No float copy of those matrices anywhere: no float linear layer left in the decoder layers,
    # and the float fused step's weight cache was never built on this model.
    assert not any(type(m) is torch.nn.Linear for m in language_model.layers.modules())
    assert "_fused_decode_weights" not in pipeline.model.__dict__
    assert decoder.keys.dtype == torch.float32 and decoder.keys.shape[1] == 2


def test_int8_is_refused_on_cuda_before_loading(tiny_llava):
    from engine.errors import EngineError

    with pytest.raises(EngineError) as info:
        load_pipeline(tiny_llava, "cuda", dtype="int8")
    assert info.value.code == "bad_request" and "CPU" in info.value.message


def test_every_answer_carries_its_confidence(tiny_llava):
    import math

    pipeline = load_pipeline(tiny_llava, "cpu")
    answer = pipeline.answer([chip()], "classify", None, max_new_tokens=6)[0]
    assert answer.text_score is not None and 0.0 < answer.text_score <= 1.0
    assert not math.isnan(answer.text_score)
