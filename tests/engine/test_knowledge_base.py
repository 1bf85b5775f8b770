"""RS semantic knowledge base: entry validation, the real MiniLM encoder and the real faiss index."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine.errors import BAD_CHECKPOINT, EngineError
from engine.knowledge import (
    DEFAULT_ENTRIES, DEFAULT_INDEX_DIR, EMBED_DIM, LEVELS, KnowledgeBase, SentenceEncoder,
    build_index, load_entries, main,
)

REQUIRED = {
    "scene": ["airport", "harbor", "residential", "industrial", "farmland", "forest", "parking lot",
              "river", "sports field", "bare land"],
    "object": ["airplane", "ship", "storage tank", "vehicle", "building", "tennis court", "bridge",
               "swimming pool", "white", "red", "blue", "green", "grey", "yellow", "small", "medium",
               "large", "horizontal", "vertical", "diagonal"],
    "region": ["water", "vegetation", "built-up", "road", "bare soil", "agriculture"],
}


def _entry(id_: str, **over) -> dict:
    d = {"id": id_, "level": "object", "kind": "object_class", "name": id_.split(".")[-1].replace("_", " "),
         "definition": "A test object.", "aliases": [], "sources": ["general"]}
    d.update(over)
    return d


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    enc = SentenceEncoder()
    enc.encode(["warm-up"])  # load the model once for the whole module
    return enc


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory, encoder) -> Path:
    return build_index([DEFAULT_ENTRIES], tmp_path_factory.mktemp("kb"), encoder)


@pytest.fixture(scope="module")
def kb(built_dir) -> KnowledgeBase:
    return KnowledgeBase.load(built_dir)


def _top_names(kb: KnowledgeBase, query: str, k: int, level: str | None) -> list[str]:
    _, ids = kb.search_text([query], k, level)
    return [kb.entry(i).name for i in ids[0] if i >= 0]


def test_airplanes_on_runway_retrieve_airport_scene_and_airplane_object(kb):
    query = "What are the airplanes parked on the runway?"
    assert "airport" in _top_names(kb, query, 3, "scene")
    assert "airplane" in _top_names(kb, query, 3, "object")


def test_many_oil_tanks_retrieve_storage_tank(kb):
    assert "storage tank" in _top_names(kb, "many oil tanks", 3, "object")


def test_level_filter_returns_only_that_level(kb):
    queries = ["a red car in a parking lot", "fields of crops beside a river"]
    for level in LEVELS:
        scores, ids = kb.search_text(queries, 10, level)
        assert ids.shape == scores.shape == (2, 10)
        assert {kb.entry(i).level for i in ids.ravel()} == {level}
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_search_pads_when_level_has_fewer_than_k_entries(kb):
    n_region = int((kb.level_ids == LEVELS.index("region")).sum())
    scores, ids = kb.search(kb.embeddings[:1], n_region + 5, "region")
    assert (ids[0, n_region:] == -1).all() and np.isneginf(scores[0, n_region:]).all()
    assert (ids[0, :n_region] >= 0).all()


def test_user_entry_file_becomes_retrievable_after_rebuild(tmp_path, encoder):
    user = _write_jsonl(tmp_path / "mine.jsonl", [_entry(
        "object.flamingo_colony", name="flamingo colony",
        definition="Hundreds of pink wading birds standing together in shallow salty lagoon water.")])
    out = tmp_path / "index"
    assert main(["--entries", str(user), "--out", str(out)]) == 0
    kb = KnowledgeBase.load(out)
    assert kb.is_stale([DEFAULT_ENTRIES]) and not kb.is_stale([DEFAULT_ENTRIES, user])
    _, ids = kb.search_text(["pink birds in a lagoon"], 1, "object")
    assert kb.entry(ids[0, 0]).id == "object.flamingo_colony"


def test_duplicate_ids_are_refused_with_clear_message(tmp_path):
    user = _write_jsonl(tmp_path / "dup.jsonl", [_entry("scene.airport", level="scene", kind="scene_class")])
    with pytest.raises(EngineError) as err:
        load_entries([DEFAULT_ENTRIES, user])
    assert err.value.code == BAD_CHECKPOINT
    assert "duplicate id 'scene.airport'" in err.value.message and f"{user}:1" in err.value.message


def test_bad_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_entry("object.a")) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(EngineError, match=re.escape(f"{path}:3: invalid JSON")):
        load_entries([path])
    _write_jsonl(path, [_entry("object.a"), _entry("object.b", level="scene")])
    with pytest.raises(EngineError, match=re.escape(f"{path}:2: level 'scene' is not allowed")):
        load_entries([path])


def test_index_round_trip_gives_same_scores_as_fresh_build(built_dir, kb, encoder):
    entries = load_entries([DEFAULT_ENTRIES])
    fresh = encoder.encode([e.text for e in entries])
    q = encoder.encode(["boats moored along a quay", "a large white storage tank"])
    expect_ids = np.argsort(-(q @ fresh.T), axis=1, kind="stable")[:, :5]
    scores, ids = kb.search(q, 5)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ fresh.T, ids, axis=1), atol=1e-5)
    np.testing.assert_array_equal(ids, expect_ids)
    np.testing.assert_allclose(kb.embeddings, fresh, atol=1e-6)
    assert [e.id for e in kb.entries] == [e.id for e in entries]


def test_missing_index_file_is_bad_checkpoint(tmp_path, built_dir):
    for name in ("meta.json", "entries.jsonl", "embeddings.npy"):
        (tmp_path / name).write_bytes((built_dir / name).read_bytes())
    with pytest.raises(EngineError, match="missing \\['index.faiss'\\]") as err:
        KnowledgeBase.load(tmp_path)
    assert err.value.code == BAD_CHECKPOINT


def test_count_mismatch_is_bad_checkpoint(tmp_path, built_dir):
    for name in ("meta.json", "entries.jsonl", "index.faiss"):
        (tmp_path / name).write_bytes((built_dir / name).read_bytes())
    np.save(tmp_path / "embeddings.npy", np.load(built_dir / "embeddings.npy")[:-1])
    with pytest.raises(EngineError, match="inconsistent") as err:
        KnowledgeBase.load(tmp_path)
    assert err.value.code == BAD_CHECKPOINT


def test_at_least_230_entries_and_every_required_name_present(kb):
    assert len(kb) >= 230
    for level, names in REQUIRED.items():
        for name in names:
            assert kb.entry(kb.id_of_name(name, level)).name == name, (level, name)
    for name in REQUIRED["region"]:
        assert kb.entry(kb.id_of_name(name, "region")).kind == "land_cover"
    for name in REQUIRED["object"][8:]:
        assert kb.entry(kb.id_of_name(name, "object")).kind == "attribute"


def test_every_benchmark_appears_in_sources(kb):
    sources = {s for e in kb.entries for s in e.sources}
    assert {"UCM", "AID", "NWPU-RESISC45", "DIOR", "DOTA", "LoveDA"} <= sources


def test_query_vectors_of_wrong_width_are_refused(kb):
    with pytest.raises(ValueError, match="shape"):
        kb.search(np.zeros((2, EMBED_DIM // 2), dtype=np.float32), 3)


def test_level_ids_and_embeddings_match_entries(kb):
    assert kb.embeddings.shape == (len(kb), EMBED_DIM) and kb.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(kb.embeddings, axis=1), 1.0, atol=1e-5)
    assert [LEVELS[i] for i in kb.level_ids] == [e.level for e in kb.entries]


def test_shipped_index_is_up_to_date():
    assert not KnowledgeBase.load(DEFAULT_INDEX_DIR).is_stale([DEFAULT_ENTRIES])


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _faiss_gpus() -> int:
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_cuda_encoder_matches_cpu_encoder(encoder):
    texts = ["airplanes parked on a runway", "many oil tanks"]
    np.testing.assert_allclose(SentenceEncoder("cuda").encode(texts), encoder.encode(texts), atol=2e-3)


@pytest.mark.skipif(not _cuda() or _faiss_gpus() == 0, reason="needs CUDA and faiss-gpu")
def test_faiss_gpu_index_gives_same_results_as_cpu(kb, built_dir):
    gpu_kb = KnowledgeBase.load(built_dir, device="cuda")
    assert gpu_kb.on_gpu
    q = kb.embeddings[:4]
    for level in (None, "scene"):
        s_cpu, i_cpu = kb.search(q, 5, level)
        s_gpu, i_gpu = gpu_kb.search(q, 5, level)
        np.testing.assert_array_equal(i_cpu, i_gpu)
        np.testing.assert_allclose(s_cpu, s_gpu, atol=1e-4)
