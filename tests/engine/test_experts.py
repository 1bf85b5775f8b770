"""Semantic-aware experts: hard routing of visual tokens by level, learned gate for text."""
from __future__ import annotations

import torch

from engine.model.experts import SemanticExpertMLP

# text, object, object, region, scene, text, scene, region
LEVELS = torch.tensor([[0, 1, 1, 2, 3, 0, 3, 2]])


def _mlp() -> SemanticExpertMLP:
    torch.manual_seed(0)
    return SemanticExpertMLP(hidden_size=16, intermediate_size=32, expert_intermediate_size=8)


def test_zeroing_scene_expert_changes_only_scene_and_text_positions():
    mlp = _mlp()
    x = torch.randn(1, LEVELS.shape[1], 16)
    before = mlp(x, LEVELS)
    with torch.no_grad():
        for p in mlp.experts[2].parameters():
            p.zero_()
    after = mlp(x, LEVELS)
    changed = ~torch.isclose(before, after).all(dim=-1)[0]
    assert changed.tolist() == [lv in (0, 3) for lv in LEVELS[0].tolist()]


def test_visual_tokens_use_shared_plus_their_level_expert_only():
    mlp = _mlp()
    x = torch.randn(1, LEVELS.shape[1], 16)
    out = mlp(x, LEVELS)[0]
    for pos, level in enumerate(LEVELS[0].tolist()):
        if level:
            expected = mlp.shared_expert(x[0, pos]) + mlp.experts[level - 1](x[0, pos])
            assert torch.allclose(out[pos], expected, atol=1e-6)


def test_text_tokens_use_the_softmax_gate_over_level_experts():
    mlp = _mlp()
    x = torch.randn(1, LEVELS.shape[1], 16)
    out = mlp(x, LEVELS)[0]
    for pos in (0, 5):
        h = x[0, pos]
        gate = torch.softmax(mlp.router(h), dim=-1)
        expected = mlp.shared_expert(h) + sum(gate[e] * mlp.experts[e](h) for e in range(3))
        assert torch.allclose(out[pos], expected, atol=1e-6)
    with torch.no_grad():                                  # the gate is learned: changing it matters
        mlp.router.weight.add_(torch.randn_like(mlp.router.weight))
    out2 = mlp(x, LEVELS)[0]
    assert not torch.allclose(out2[0], out[0]) and torch.allclose(out2[1], out[1])


def test_all_text_when_levels_are_not_given():
    mlp = _mlp()
    x = torch.randn(2, 3, 16)
    assert torch.equal(mlp(x), mlp(x, torch.zeros(2, 3, dtype=torch.long)))
