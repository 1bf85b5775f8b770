"""The LLaVA backend (GeoChat / LLaVA-1.5 family) behind the engine's pipeline interface.

Tiny random checkpoints written here in the transformers layout (CLIP vision tower + Llama, the
real config keys at toy sizes) with a character-level tokenizer, so every token is one character
and a forced answer is easy to spell.  The builders are imported by test_convert.py as well.
"""
from __future__ import annotations

import json
import string
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from engine.backends import load_pipeline
from engine.backends.llava import VICUNA_V1_SYSTEM, LlavaPipeline
from engine.errors import BAD_CHECKPOINT, EngineError

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def char_tokenizer(with_image: bool = True):
    """A character-level fast tokenizer: <unk>=0, <s>=1, </s>=2, <pad>=3, printable characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    if with_image:
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tok


def tiny_llava_config(vocab_size: int, image_token_index: int, image_size: int = 28):
    from transformers import LlavaConfig

    vision = dict(VISION, model_type="clip_vision_model", image_size=image_size)
    text = dict(TEXT, model_type="llama", vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    grid = image_size // VISION["patch_size"]
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       image_seq_length=grid * grid, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def write_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A transformers-layout LlavaForConditionalGeneration folder (safetensors) + tokenizer."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = LlavaForConditionalGeneration(tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>")))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class ForceText:
    """A LogitsProcessor that makes the model write ``text`` (one character per token), then ``</s>``."""

    def __init__(self, tokenizer, text: str) -> None:
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


class BanTokens:
    """A LogitsProcessor that forbids some ids (here: ``</s>``, for answers of a known length)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.ids] = float("-inf")
        return scores


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def pipeline(tiny_llava) -> LlavaPipeline:
    return load_pipeline(tiny_llava, "cpu")


def chip(value: int = 90) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)


def test_transformers_llava_folder_loads_through_load_pipeline(pipeline, tiny_llava):
    info = pipeline.info()
    assert isinstance(pipeline, LlavaPipeline) and pipeline.device == "cpu" and pipeline.image_size == 28
    assert info["backend"] == "llava" and info["parameters"]["total"] > 0 and info["dtype"] == "float32"
    assert "no knowledge base" in info["retrieval"] and info["path"] == str(tiny_llava)


def test_prompt_is_vicuna_v1_with_one_image_token_per_patch(pipeline):
    ids = pipeline.prompt_ids("[grounding] Describe the image in detail.")
    image_positions = [i for i, t in enumerate(ids) if t == pipeline.image_token_id]
    assert ids[0] == pipeline.tokenizer.bos_token_id and len(image_positions) == 4   # (28 / 14) ** 2 patches
    before = pipeline.tokenizer.decode(ids[1:image_positions[0]])
    after = pipeline.tokenizer.decode(ids[image_positions[-1] + 1:])
    assert before == f"{VICUNA_V1_SYSTEM} USER: "
    assert after == "\n[grounding] Describe the image in detail. ASSISTANT:"


def test_answer_streams_every_token_to_the_callback(pipeline):
    pieces: list[tuple[int, str]] = []
    tok = pipeline.tokenizer        # no </s>, no <unk> (decodes to nothing), no "U" (held: could start "USER:")
    pipeline.logits_processors = [BanTokens([tok.eos_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("U")])]
    try:
        answer = pipeline.answer([chip()], "caption", None, max_new_tokens=8,
                                 on_token=lambda i, piece: pieces.append((i, piece)))[0]
    finally:
        pipeline.logits_processors = []
    assert len(pieces) == 8 and all(i == 0 for i, _ in pieces)
    assert "".join(p for _, p in pieces).strip() == answer.text
    assert answer.stopped_reason == "max_tokens" and answer.timing["new_tokens"] == 8 and answer.retrieved == []


def test_should_stop_cancels_between_tokens(pipeline):
    pieces: list[str] = []
    tok = pipeline.tokenizer
    pipeline.logits_processors = [BanTokens([tok.eos_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("U")])]
    try:
        answer = pipeline.answer([chip()], "vqa", "how many ships?", max_new_tokens=20,
                                 on_token=lambda i, piece: pieces.append(piece),
                                 should_stop=lambda: len(pieces) >= 3)[0]
    finally:
        pipeline.logits_processors = []
    assert len(pieces) == 3 and answer.stopped_reason == "cancelled" and answer.timing["new_tokens"] == 3


def test_answer_ends_at_a_new_user_turn_and_never_streams_it(pipeline):
    pieces: list[str] = []
    pipeline.logits_processors = [ForceText(pipeline.tokenizer, "Three ships. USER: and more")]
    try:
        answer = pipeline.answer([chip()], "vqa", "how many ships?", max_new_tokens=40,
                                 on_token=lambda i, piece: pieces.append(piece))[0]
    finally:
        pipeline.logits_processors = []
    assert answer.text == "Three ships." and answer.stopped_reason == "stop_string"
    assert "".join(pieces) == "Three ships. "


def test_grounding_answer_becomes_georeferenced_polygons(tiny_llava, tmp_path):
    from geo_rasters import write_raster

    from engine.service import EngineService

    raster = write_raster(tmp_path / "utm.tif")                   # EPSG:32633, 10 m pixels, 200 x 160
    service = EngineService(default_model=tiny_llava, default_device="cpu")
    pipe = service.pipeline(str(tiny_llava), "cpu")
    assert isinstance(pipe, LlavaPipeline)
    pipe.logits_processors = [ForceText(pipe.tokenizer, "airplane {<10><20><30><40>|0}")]
    left, top = raster.transform @ (0, 0)
    right, bottom = raster.transform @ (raster.width, raster.height)
    tokens: list[str] = []

    class Ctx:
        def progress(self, done, total, message=""): pass
        def token(self, text): tokens.append(text)
        def should_stop(self): return False
        def check_cancelled(self): pass

    result = service.ask({"raster": str(raster.path), "bbox": [left, bottom, right, top], "task": "ground",
                          "model": str(tiny_llava), "device": "cpu", "max_tokens": 64}, Ctx())
    assert result["raw"] == "airplane {<10><20><30><40>|0}" and "".join(tokens) == result["raw"]
    assert result["text"] == "1 airplane"                  # what a person reads: no box syntax
    assert result["retrieved"] == [] and result["crs"] == "EPSG:32633" and result["stopped"] == "eos"
    (box,) = result["boxes"]
    assert box["label"] == "airplane" and 0.0 < box["score"] < 1.0     # the random model's own probability
    corners = [raster.transform @ (fx * raster.width, fy * raster.height)
               for fx, fy in ((0.1, 0.2), (0.3, 0.2), (0.3, 0.4), (0.1, 0.4))]
    from shapely import wkt

    polygon = wkt.loads(box["wkt"])
    expected = Polygon(corners)
    assert polygon.symmetric_difference(expected).area < 1e-6 * expected.area
    assert expected.bounds == pytest.approx((300200.0, 4999360.0, 300600.0, 4999680.0))


def test_folder_of_bin_files_is_refused_with_the_convert_command(tmp_path):
    folder = tmp_path / "llava-bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(EngineError) as err:
        load_pipeline(folder, "cpu")
    assert err.value.code == BAD_CHECKPOINT
    assert "safetensors only" in err.value.message and f"python -m engine convert --from {folder}" in err.value.message


def test_original_layout_folder_is_refused_with_the_convert_command(tmp_path):
    folder = tmp_path / "geochat"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "geochat", "mm_vision_tower": "openai/clip"}))
    with pytest.raises(EngineError) as err:
        load_pipeline(folder, "cpu")
    assert err.value.code == BAD_CHECKPOINT
    assert "python -m engine convert" in err.value.message and "--vision-tower" in err.value.message


def test_memory_check_refuses_with_the_figures(tiny_llava, monkeypatch):
    from engine.backends import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: (50 * 2 ** 20, "test figure"))
    with pytest.raises(EngineError) as err:
        load_pipeline(tiny_llava, "cpu")
    assert err.value.code == memory.MODEL_TOO_LARGE
    message = err.value.message
    assert "needs about 0.2" in message and "only 0.05 GB is available (test figure)" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_7b_llava_generates_on_gpu_in_bf16(record_property):
    """LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + Vicuna-7B), random weights, bf16: tokens/s."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)
    torch.manual_seed(0)
    with torch.device("cuda"):                    # random initialisation on the GPU (fp32, then bf16)
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    tok = char_tokenizer(with_image=False)
    pipe = LlavaPipeline(model.eval(), tok, config.to_dict(), "cuda", Path("random-7b"), torch.bfloat16)
    pipe.logits_processors = [BanTokens([2])]
    pipe.answer([chip()], "caption", None, max_new_tokens=4)               # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    answer = pipe.answer([chip()], "ground", None, max_new_tokens=64)[0]
    torch.cuda.synchronize()
    rate = answer.timing["new_tokens"] / (time.perf_counter() - t0)
    record_property("llava7b_bf16_tokens_per_s", round(rate, 1))
    print(f"random LLaVA-7B bf16 on {torch.cuda.get_device_name()}: {rate:.1f} tokens/s "
          f"(first token {answer.timing['first_token_s']:.3f} s)")
    assert answer.timing["new_tokens"] == 64 and rate > 1.0
