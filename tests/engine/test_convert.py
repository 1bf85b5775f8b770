"""``python -m engine convert``: original LLaVA/GeoChat and pickle checkpoints -> safetensors LLaVA.

The tiny original-layout checkpoint below has GeoChat's config keys and parameter names
(``model.layers.*``, ``model.embed_tokens``, ``lm_head``, ``model.mm_projector.0/2``) at toy
sizes, written as two ``.bin`` shards with torch.save, plus a separate CLIP tower folder laid out
like openai/clip-vit-large-patch14-336 (a full CLIPModel, ``vision_model.*`` and ``text_model.*``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.backends import load_pipeline
from engine.backends.llava import LlavaPipeline
from engine.convert import convert, read_weights
from engine.errors import BAD_CHECKPOINT, EngineError
from test_llava_backend import TEXT, VISION, ForceText, char_tokenizer, chip, tiny_llava_config

TOWER_SIZE, CHECKPOINT_SIZE = 28, 42           # tiny stand-ins for GeoChat's 336 -> 504 px (grid 2 -> 3)


class NotATensor:
    """Anything a weights file must not hold (pickled by reference to this module)."""

    def __init__(self) -> None:
        self.payload = "arbitrary object"


def write_clip_tower(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    config = CLIPConfig(vision_config=dict(VISION, image_size=TOWER_SIZE), projection_dim=16,
                        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1))
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    state = {k: v.clone() for k, v in CLIPModel(config).state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": TOWER_SIZE, "size": TOWER_SIZE, "do_normalize": True, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return state


def write_original_geochat(folder: Path, tower: dict[str, torch.Tensor] | None = None,
                           tower_name: str = "openai/clip-vit-large-patch14-336") -> dict[str, torch.Tensor]:
    """GeoChat's layout: Llama weights + mm_projector in two .bin shards, config with mm_* keys.

    ``tower``: CLIP weights to store inside the checkpoint too (model.vision_tower.vision_tower.*).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    tok = char_tokenizer(with_image=False)
    vocab = len(tok)
    llama = LlamaForCausalLM(LlamaConfig(**TEXT, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    state = {k: v.clone().half() for k, v in llama.state_dict().items()}
    hidden = TEXT["hidden_size"]
    state.update({"model.mm_projector.0.weight": torch.randn(hidden, VISION["hidden_size"]).half(),
                  "model.mm_projector.0.bias": torch.randn(hidden).half(),
                  "model.mm_projector.2.weight": torch.randn(hidden, hidden).half(),
                  "model.mm_projector.2.bias": torch.randn(hidden).half(),
                  "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})   # old buffer, dropped
    for key, tensor in (tower or {}).items():
        if key.startswith("vision_model."):
            state[f"model.vision_tower.vision_tower.{key}"] = tensor.half()
    folder.mkdir(parents=True)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    config = {"_name_or_path": "geochat-7B", "architectures": ["GeoChatLlamaForCausalLM"], "model_type": "geochat",
              **TEXT, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              "torch_dtype": "float16", "use_cache": True, "tie_word_embeddings": False,
              "mm_vision_tower": tower_name, "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": VISION["hidden_size"], "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
              "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(folder)
    return state


def run_convert(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "engine", "convert", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("convert")
    tower = write_clip_tower(root / "clip-vit-tiny")
    original = write_original_geochat(root / "geochat-tiny")
    out = root / "geochat-tiny-engine"
    proc = run_convert(repo_root, "--from", str(root / "geochat-tiny"), "--to", str(out),
                       "--vision-tower", str(root / "clip-vit-tiny"), "--image-size", str(CHECKPOINT_SIZE))
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "summary": json.loads(proc.stdout), "tower": tower, "original": original}


def test_original_layout_converts_with_the_cli_and_streams_an_answer(converted):
    out, summary = converted["out"], converted["summary"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_size"] == CHECKPOINT_SIZE
    assert config["rs_lvlm"]["source_model_type"] == "geochat" and summary["image_token_index"] == 100
    assert not list(out.glob("*.bin")) and len(summary["shards"]) == 3 and (out / "tokenizer.json").is_file()
    pipe = load_pipeline(out, "cpu")
    assert isinstance(pipe, LlavaPipeline) and pipe.image_tokens == 9            # (42 / 14) ** 2
    pieces: list[str] = []
    pipe.logits_processors = [ForceText(pipe.tokenizer, "ship {<1><2><3><4>|45}")]
    answer = pipe.answer([chip()], "ground", "ships", max_new_tokens=40, on_token=lambda i, p: pieces.append(p))[0]
    assert "".join(pieces) == answer.text == "ship {<1><2><3><4>|45}" and answer.stopped_reason == "eos"
    assert [(b.x1, b.y1, b.x2, b.y2, b.angle, b.label) for b in answer.boxes] == [(1, 2, 3, 4, 45, "ship")]


def test_converted_weights_keep_their_values_under_the_llava_names(converted):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(converted["out"]), dtype=torch.float32)
    src = converted["original"]
    inner = model.model
    proj = inner.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, src["model.mm_projector.0.weight"].float())
    assert torch.equal(proj.linear_2.bias, src["model.mm_projector.2.bias"].float())
    layer = inner.language_model.layers[1]
    assert torch.equal(layer.mlp.down_proj.weight, src["model.layers.1.mlp.down_proj.weight"].float())
    embed, head = inner.language_model.embed_tokens.weight, model.lm_head.weight
    assert embed.shape[0] == head.shape[0] == 101                                   # + <image>
    assert torch.equal(head[:100], src["lm_head.weight"].float())
    assert torch.allclose(embed[100], src["model.embed_tokens.weight"].float().mean(0), atol=1e-3)


def test_vision_position_embeddings_are_interpolated_to_the_checkpoint_image_size(converted):
    from safetensors import safe_open

    out = converted["out"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "vision_tower.vision_model.embeddings.position_embedding.weight"
    with safe_open(str(out / index[key]), framework="pt") as f:
        new = f.get_tensor(key).float()
    old = converted["tower"]["vision_model.embeddings.position_embedding.weight"]
    assert new.shape == (1 + 3 * 3, VISION["hidden_size"]) and old.shape[0] == 1 + 2 * 2
    grid_old, grid_new = old[1:].reshape(2, 2, -1), new[1:].reshape(3, 3, -1)
    assert torch.allclose(new[0], old[0], atol=1e-3)                                # class token kept
    for (r, c), (R, C) in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 0), (0, 2), (2, 0), (2, 2)]):
        assert torch.allclose(grid_new[R, C], grid_old[r, c], atol=1e-3)           # aligned corners kept


def test_checkpoint_carrying_its_tower_converts_without_a_tower_folder_at_geochat_size(tmp_path, monkeypatch):
    from safetensors import safe_open

    from engine.backends import original_llava

    monkeypatch.setitem(original_llava.KNOWN_TOWERS, "tiny/clip-vit-test", dict(VISION, image_size=TOWER_SIZE))
    tower = write_clip_tower(tmp_path / "only-for-weights")
    write_original_geochat(tmp_path / "geochat", tower=tower, tower_name="tiny/clip-vit-test")
    summary = convert(tmp_path / "geochat", tmp_path / "out")
    assert summary["image_size"] == 504 and summary["position_embeddings_interpolated"]   # GeoChat's default
    out = tmp_path / "out"
    key = "vision_tower.vision_model.embeddings.position_embedding.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(str(out / shard), framework="pt") as f:
        assert tuple(f.get_slice(key).get_shape()) == (1 + 36 * 36, VISION["hidden_size"])
    assert json.loads((out / "config.json").read_text())["vision_config"]["image_size"] == 504


def test_original_checkpoint_without_its_tower_asks_for_vision_tower(tmp_path):
    write_original_geochat(tmp_path / "geochat")
    with pytest.raises(EngineError) as err:
        convert(tmp_path / "geochat", tmp_path / "out")
    assert "--vision-tower" in err.value.message and "openai/clip-vit-large-patch14-336" in err.value.message
    assert not (tmp_path / "out").exists()


def test_bin_with_a_non_tensor_pickle_is_refused_by_the_converter(tmp_path):
    src = tmp_path / "llava-evil"
    src.mkdir()
    tiny_llava_config(101, 100).save_pretrained(src)
    torch.save({"lm_head.weight": torch.zeros(2, 2), "extra": NotATensor()}, src / "pytorch_model.bin")
    with pytest.raises(EngineError) as err:
        convert(src, tmp_path / "out")
    assert err.value.code == BAD_CHECKPOINT and "pytorch_model.bin" in err.value.message
    assert "refused" in err.value.message and not (tmp_path / "out").exists()


def test_transformers_layout_bin_folder_converts_and_loads(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from engine.backends.original_llava import published_name

    src = tmp_path / "llava-hf-bin"
    src.mkdir()
    tok = char_tokenizer()
    model = LlavaForConditionalGeneration(tiny_llava_config(len(tok), 100))
    model.config.save_pretrained(src)
    tok.save_pretrained(src)
    torch.save({published_name(k): v.clone() for k, v in model.state_dict().items()}, src / "pytorch_model.bin")
    summary = convert(src, tmp_path / "llava-hf-engine")
    assert summary["layout"] == "transformers" and summary["shards"] == ["model.safetensors"]
    pipe = load_pipeline(tmp_path / "llava-hf-engine", "cpu")
    lm_head = model.lm_head.weight
    assert isinstance(pipe, LlavaPipeline) and torch.equal(pipe.model.lm_head.weight, lm_head)


def test_read_weights_returns_a_plain_tensor_dict(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save({"state_dict": {"a.weight": torch.arange(6.0).reshape(2, 3)}}, path)
    weights = read_weights(path)
    assert list(weights) == ["a.weight"] and torch.equal(weights["a.weight"], torch.arange(6.0).reshape(2, 3))


def test_sentencepiece_tokenizer_model_is_rebuilt_without_sentencepiece(tmp_path):
    from transformers.convert_slow_tokenizer import import_protobuf

    from engine.backends.tokenizer_files import load_tokenizer

    proto = import_protobuf().ModelProto()
    proto.trainer_spec.model_type = 2                     # BPE, as Llama / Vicuna
    proto.trainer_spec.byte_fallback = True
    pieces = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in range(256)]
    pieces += [(p, 1) for p in ("▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "llo", "▁he", "▁hello")]
    for i, (text, kind) in enumerate(pieces):
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = text, kind, -float(i)
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": {"content": "<s>"}, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<unk>", "legacy": False}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[0] == "▁hello" and ids[0] == len(pieces) - 1
    assert tok.decode(ids) == "hello world" and (tok.bos_token_id, tok.eos_token_id) == (1, 2)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside/model.safetensors", "sub/../../x.safetensors"])
def test_an_index_naming_files_outside_the_checkpoint_folder_is_refused(tmp_path, name):
    from engine.convert import weight_files

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.safetensors").write_bytes(b"x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(EngineError) as exc:
        weight_files(folder)
    assert exc.value.code == BAD_CHECKPOINT and "inside" in exc.value.message
