"""GPU paths of the model (skipped without CUDA): bf16 training step, cached generation, loading."""
from __future__ import annotations

import pytest
import torch

from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.backends.rs_lvlm import generate
from engine.model.tokenizer import build_tokenizer
from model_helpers import prompt_batch, small_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_autocast_training_step_on_cuda_reduces_the_loss():
    model = small_model().cuda().train()
    ids, mask = prompt_batch(model.config, [12, 9])
    ids, mask = ids.cuda(), mask.cuda()
    labels = ids.masked_fill(mask == 0, -100)
    pixels, question = torch.randn(2, 3, 32, 32, device="cuda"), torch.randn(2, 384, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(pixels, ids, mask, labels, question)
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_cached_generation_equals_uncached_on_cuda():
    model = small_model(seed=3).cuda().eval()
    ids, mask = prompt_batch(model.config, [9, 6], seed=2)
    pixels, question = torch.randn(2, 3, 32, 32), torch.randn(2, 384)
    cached = generate(model, pixels, ids, mask, question, max_new_tokens=8)
    uncached = generate(model, pixels, ids, mask, question, max_new_tokens=8, use_cache=False)
    assert cached.sequences == uncached.sequences


def test_checkpoint_loads_on_cuda_in_bfloat16(tmp_path):
    tokenizer = build_tokenizer(["an airport with airplanes."] * 10, vocab_size=400)
    model = small_model(vocab_size=len(tokenizer)).eval()
    save_checkpoint(model, tokenizer, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m", device="cuda", dtype=torch.bfloat16)
    assert loaded.model.device.type == "cuda" and loaded.model.dtype == torch.bfloat16
    ids, mask = prompt_batch(loaded.config, [7])
    result = generate(loaded.model, torch.randn(1, 3, 32, 32), ids, mask, torch.randn(1, 384), max_new_tokens=4,
                      tokenizer=loaded.tokenizer)
    assert len(result.sequences[0]) >= 1
