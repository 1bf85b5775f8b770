"""Which engine answers a LLaVA folder: vLLM where it can run, else transformers with one line why."""
from __future__ import annotations

import numpy as np
import pytest

from engine.backends.vllm_engine import build_requests, choose_backend, vllm_installed
from engine.errors import EngineError


def test_transformers_is_chosen_on_a_cpu_without_a_word_when_nothing_was_asked():
    assert choose_backend("auto", "llava", "cpu") == ("transformers", None)


def test_asking_for_vllm_where_it_cannot_run_falls_back_with_the_reason():
    engine, reason = choose_backend("vllm", "llava", "cpu")
    assert engine == "transformers" and reason.startswith("vLLM not used") and "CUDA" in reason


def test_the_embedded_model_never_goes_to_vllm():
    engine, reason = choose_backend("vllm", "rs_lvlm", "cuda")
    assert engine == "transformers" and "LLaVA" in reason


def test_an_unknown_backend_is_a_bad_request():
    with pytest.raises(EngineError) as info:
        choose_backend("tensorrt", "llava", "cuda")
    assert info.value.code == "bad_request"


def test_requests_carry_the_prompt_and_one_rgb_image_each():
    images = [np.zeros((20, 30), dtype=np.uint8), np.full((8, 8, 4), 200, dtype=np.uint8)]
    requests = build_requests(images, "SYSTEM USER: <image>\nWhat is this? ASSISTANT:")
    assert [r["multi_modal_data"]["image"].size for r in requests] == [(30, 20), (8, 8)]
    assert all(r["multi_modal_data"]["image"].mode == "RGB" and r["prompt"].count("<image>") == 1 for r in requests)
    with pytest.raises(ValueError):
        build_requests(images, "no placeholder")


def test_the_fallback_reason_reaches_the_ask_result(tmp_path):
    from engine.service import EngineService
    from geo_rasters import write_raster
    from test_llava_backend import write_tiny_llava

    model = write_tiny_llava(tmp_path / "llava")
    raster = write_raster(tmp_path / "r.tif", crs="EPSG:32633")
    left, top = raster.transform.c, raster.transform.f
    result = EngineService().ask({"raster": str(raster.path), "task": "caption", "model": str(model), "device": "cpu",
                                  "backend": "vllm", "max_tokens": 4,
                                  "bbox": [left, top - 640, left + 640, top]})
    assert any(w.startswith("vLLM not used") for w in result["warnings"])


@pytest.mark.skipif(not vllm_installed(), reason="vllm is not installed (CUDA only)")
def test_vllm_answers_a_tiny_llava_on_the_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from engine.backends import load_pipeline
    from test_llava_backend import chip, write_tiny_llava

    pipeline = load_pipeline(write_tiny_llava(tmp_path / "llava"), "cuda", backend="vllm")
    pieces: list[str] = []
    answer = pipeline.answer([chip()], "caption", None, max_new_tokens=8, on_token=lambda _r, p: pieces.append(p))[0]
    assert pipeline.backend == "vllm" and "".join(pieces).strip() == answer.text
