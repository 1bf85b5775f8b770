"""Semantic Augmentation Module: per-level retrieval, identity at init, faiss equivalence, loss."""
from __future__ import annotations

import faiss
import numpy as np
import torch

from engine.model.config import LEVEL_NAMES
from engine.model.semantic_augmentation import SemanticAugmentation
from model_helpers import random_knowledge, small_config


def _sam_and_levels(seed: int = 0):
    torch.manual_seed(seed)
    config = small_config()
    emb, lv = random_knowledge(seed=seed)
    sam = SemanticAugmentation(config, emb, lv)
    levels = tuple(torch.randn(2, n, config.vision_hidden_size) for n in (16, 4, 6))
    return sam, levels, torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)


def test_retrieved_ids_belong_to_their_level():
    sam, levels, q = _sam_and_levels()
    out = sam(levels, q)
    for index, name in enumerate(LEVEL_NAMES):
        scores, ids = out.retrieved[name]
        assert ids.shape == scores.shape == (2, sam.top_k)
        assert set(sam.knowledge_levels[ids].flatten().tolist()) == {index}
        assert torch.all(scores[:, :-1] >= scores[:, 1:])          # best first


def test_zero_initialised_gate_makes_sam_the_identity():
    sam, levels, q = _sam_and_levels()
    out = sam(levels, q)
    for before, after in zip(levels, out.levels):
        assert torch.equal(before, after)
    with torch.no_grad():
        sam.fusion[2].attn_gate.fill_(0.5)
    out = sam(levels, q)
    assert torch.equal(out.levels[0], levels[0]) and not torch.allclose(out.levels[2], levels[2])


def test_faiss_retriever_gives_the_same_ids_as_exact_search():
    sam, levels, q = _sam_and_levels(seed=1)
    emb = sam.knowledge_embeddings.numpy()
    lv = sam.knowledge_levels.numpy()
    indexes = {}
    for i, name in enumerate(LEVEL_NAMES):
        rows = np.flatnonzero(lv == i)
        index = faiss.IndexFlatIP(384)
        index.add(np.ascontiguousarray(emb[rows]))
        indexes[name] = (index, rows)

    def retriever(queries: np.ndarray, k: int, level: str):
        index, rows = indexes[level]
        scores, local = index.search(queries, k)
        return scores, rows[local]

    exact = sam(levels, q)
    via_faiss = sam(levels, q, retriever=retriever)
    for name in LEVEL_NAMES:
        assert torch.equal(exact.retrieved[name][1], via_faiss.retrieved[name][1])
        assert torch.allclose(exact.retrieved[name][0], via_faiss.retrieved[name][0], atol=1e-5)


def test_retrieval_loss_trains_the_query_towards_the_targets():
    sam, levels, q = _sam_and_levels(seed=2)
    target_id = int(torch.nonzero(sam.knowledge_levels == 2)[0])
    targets = torch.zeros(2, sam.knowledge_embeddings.shape[0])
    targets[:, target_id] = 1
    opt = torch.optim.Adam(sam.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = sam(levels, q, retrieval_targets={"scene": targets}).retrieval_loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert (sam(levels, q).retrieved["scene"][1][:, 0] == target_id).all()


def test_level_without_entries_is_left_unchanged():
    torch.manual_seed(0)
    config = small_config()
    emb, _ = random_knowledge()
    sam = SemanticAugmentation(config, emb, torch.zeros(emb.shape[0], dtype=torch.long))  # all object
    with torch.no_grad():
        for f in sam.fusion:
            f.attn_gate.fill_(1.0)
    levels = tuple(torch.randn(1, n, config.vision_hidden_size) for n in (16, 4, 6))
    out = sam(levels, None)
    assert out.retrieved["scene"][1].shape == (1, 0)
    assert torch.equal(out.levels[2], levels[2]) and not torch.equal(out.levels[0], levels[0])


def test_untrained_sam_retrieves_what_the_question_is_about():
    sam, levels, _ = _sam_and_levels(seed=3)
    wanted = [int(torch.nonzero(sam.knowledge_levels == i)[2]) for i in range(3)]
    question = sam.knowledge_embeddings[wanted[2]][None].repeat(2, 1)     # the question *is* entry 2
    out = sam(levels, question)
    assert (out.retrieved["scene"][1][:, 0] == wanted[2]).all()


def test_airplane_question_retrieves_airport_entries_from_the_real_knowledge_base():
    import pytest

    kb_module = pytest.importorskip("engine.knowledge")
    if not (kb_module.DEFAULT_INDEX_DIR / "index.faiss").is_file():
        pytest.skip("knowledge index not built")
    kb = kb_module.KnowledgeBase.load()
    question = torch.from_numpy(kb_module.SentenceEncoder().encode(["how many airplanes are parked on the runway?"]))
    torch.manual_seed(0)
    sam = SemanticAugmentation(small_config(retrieval_top_k=3), torch.from_numpy(kb.embeddings),
                               torch.from_numpy(kb.level_ids))
    levels = tuple(torch.randn(1, n, 32) for n in (16, 4, 6))
    retrieved = sam(levels, question).retrieved
    scene = [kb.entry(i).name for i in retrieved["scene"][1][0].tolist()]
    objects = [kb.entry(i).name for i in retrieved["object"][1][0].tolist()]
    assert scene[0] == "airport", scene
    assert any("air" in name for name in objects), objects
