"""A checkpoint's shard index may only name files inside its own folder."""
from __future__ import annotations

import json

import pytest

from engine.backends.memory import safetensors_files, shard_index
from engine.errors import EngineError


def _index(folder, names):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    return path


def test_shards_inside_the_folder_are_listed(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    _index(tmp_path, ["b.safetensors", "a.safetensors", "a.safetensors"])
    assert [p.name for p in safetensors_files(tmp_path)] == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_absolute_or_escaping_shard_names_are_refused(tmp_path, name):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(EngineError) as info:
        shard_index(_index(folder, [name]), folder)
    assert info.value.code == "bad_checkpoint" and "inside" in info.value.message
