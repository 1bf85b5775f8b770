"""The engine retrieves from an analyst's rebuilt knowledge index when it is given one."""
from __future__ import annotations

import json

import pytest

from engine.errors import EngineError
from engine.knowledge import DEFAULT_ENTRIES, build_index, load_entries, SentenceEncoder
from engine.paths import DEFAULT_MODEL_DIR, SAMPLE_RASTER
from engine.service import EngineService

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="no embedded model in resources/model yet")

VAN = {"id": "object.delivery_van", "level": "object", "kind": "object_class", "name": "delivery van",
       "definition": "A small road vehicle, a van used to deliver goods, seen from above as a short box-shaped car.",
       "aliases": ["van"], "sources": ["general"]}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    user = folder / "mine.jsonl"
    user.write_text(json.dumps(VAN) + "\n", encoding="utf-8")
    return build_index([DEFAULT_ENTRIES, user], folder / "index", SentenceEncoder())


def test_info_names_the_index_the_engine_retrieves_from(rebuilt):
    model = EngineService(knowledge_dir=rebuilt).info({})["model"]
    assert model["knowledge_index"] == str(rebuilt)
    assert model["knowledge_entries"] == len(load_entries([DEFAULT_ENTRIES])) + 1


def test_an_ask_retrieves_the_analysts_entry_from_the_rebuilt_index(rebuilt):
    def object_entries(service: EngineService) -> list[str]:
        result = service.ask({"raster": str(SAMPLE_RASTER), "task": "ground", "question": "delivery vans"})
        return [r["entry"] for r in result["retrieved"] if r["level"] == "object"]

    assert "delivery van" in object_entries(EngineService(knowledge_dir=rebuilt))
    assert "delivery van" not in object_entries(EngineService())       # the checkpoint's own index


def test_a_missing_knowledge_index_is_a_bad_checkpoint_error(tmp_path):
    with pytest.raises(EngineError) as info:
        EngineService(knowledge_dir=tmp_path / "nothing").info({})
    assert info.value.code == "bad_checkpoint" and "knowledge index" in info.value.message
