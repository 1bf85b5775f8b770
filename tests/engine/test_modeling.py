"""Whole model: training step, splicing of visual tokens, ablation switches, padding."""
from __future__ import annotations

import torch

from engine.model.config import LEVEL_NAMES
from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration
from model_helpers import prompt_batch, random_knowledge, small_config, small_model


def _batch(model: RsLvlmForConditionalGeneration, lengths=(10, 7)):
    config = model.config
    ids, mask = prompt_batch(config, list(lengths))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ids.shape[1] - min(lengths) + 2] = -100             # loss on the tail only
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(lengths), 3, config.image_size, config.image_size, generator=g)
    question = torch.nn.functional.normalize(torch.randn(len(lengths), 384, generator=g), dim=-1)
    return pixels, ids, mask, labels, question


def test_one_training_step_reduces_the_loss_on_a_fixed_batch():
    model = small_model()
    pixels, ids, mask, labels, question = _batch(model)
    targets = {"scene": torch.zeros(2, model.sam.knowledge_embeddings.shape[0])}
    targets["scene"][:, int(torch.nonzero(model.sam.knowledge_levels == 2)[0])] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = model(pixels, ids, mask, labels, question, targets)
    assert out.lm_loss is not None and out.retrieval_loss is not None
    assert torch.allclose(out.loss, out.lm_loss + model.config.retrieval_loss_weight * out.retrieval_loss)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = model(pixels, ids, mask, labels, question, targets)
    assert after.loss.item() < out.loss.item()


def test_visual_tokens_are_spliced_at_the_image_token_with_ignored_labels():
    model = small_model().eval()
    pixels, ids, mask, labels, question = _batch(model)
    nv = model.config.num_visual_tokens
    with torch.no_grad():
        out = model(pixels, ids, mask, labels, question)
    assert out.logits.shape == (2, ids.shape[1] - 1 + nv, model.config.vocab_size)
    for row in range(2):
        p = int((ids[row] == model.config.image_token_id).nonzero())
        assert (out.labels[row, p:p + nv] == -100).all()
        assert torch.equal(out.labels[row, p + nv:], labels[row, p + 1:])
        assert out.attention_mask[row, p:p + nv].all()
    assert set(out.retrieved) == set(LEVEL_NAMES)


def test_left_padded_row_computes_the_same_as_alone():
    model = small_model().eval()
    pixels, ids, mask, _, question = _batch(model)
    with torch.no_grad():
        batched = model(pixels, ids, mask, question_embeds=question).logits
        pad = int((mask[1] == 0).sum())
        alone = model(pixels[1:], ids[1:, pad:], mask[1:, pad:], question_embeds=question[1:]).logits
    assert torch.allclose(batched[1, pad:], alone[0], atol=1e-4)


def test_use_sam_and_use_experts_switches_change_the_parameter_sets():
    emb, lv = random_knowledge()
    names = {}
    for use_sam in (True, False):
        for use_experts in (True, False):
            torch.manual_seed(0)
            model = RsLvlmForConditionalGeneration(small_config(use_sam=use_sam, use_experts=use_experts), emb, lv)
            names[use_sam, use_experts] = {n for n, _ in model.named_parameters()}
            counts = model.parameter_counts()
            assert (counts["sam"] > 0) == use_sam and (counts["experts"] > 0) == use_experts
            pixels, ids, mask, labels, question = _batch(model)
            assert torch.isfinite(model(pixels, ids, mask, labels, question).loss)
    full, no_sam, no_experts = names[True, True], names[False, True], names[True, False]
    assert {n for n in full - no_sam} == {n for n in full if n.startswith("sam.")}
    assert any(".mlp.experts." in n for n in full) and not any(".mlp.experts." in n for n in no_experts)
    assert any(n.endswith("mlp.gate_proj.weight") for n in no_experts)


def test_parameter_counts_add_up():
    counts = small_model().parameter_counts()
    parts = sum(v for k, v in counts.items() if k != "total")
    assert parts == counts["total"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for checkpointing in (False, True):
        model = small_model(gradient_checkpointing=checkpointing).train()
        pixels, ids, mask, labels, question = _batch(model)
        out = model(pixels, ids, mask, labels, question)
        out.loss.backward()
        grads.append((out.loss.detach(), model.language_model.layers[0].self_attn.q_proj.weight.grad.clone(),
                      model.vision.layers[0].mlp.fc1.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6) and torch.allclose(grads[0][2], grads[1][2], atol=1e-6)
