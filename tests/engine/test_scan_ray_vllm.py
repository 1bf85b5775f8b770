"""``scan --ray`` with vLLM: Ray Data's vLLM processor on GPU clusters, the actor pool elsewhere.

On the CPU: the processor config is one ``ray.data.llm.vLLMEngineProcessorConfig`` accepts (it
forbids unknown fields), the per-tile rows carry what vLLM's engine stage reads (``prompt`` with
one ``<image>``, ``multimodal_data`` with the RGB chip, ``sampling_params``), the completions come
back georeferenced and grouped by scan batch through a real local Ray Data pipeline (a stand-in for
the GPU stage), and a CPU cluster falls back to the actor pool with one line why.  The GPU test
runs the real processor and is skipped without CUDA, vLLM and ray.data.llm.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import shapely

ray = pytest.importorskip("ray")

from engine.backends.llava import VICUNA_V1_SYSTEM  # noqa: E402
from engine.scan import ray_vllm  # noqa: E402
from engine.scan.runner import InferenceSpec, run_scan  # noqa: E402
from engine.scan.tiling import plan_tiles, tile_polygon  # noqa: E402
from engine.scan.writer import read_layer  # noqa: E402
from geo_rasters import write_raster  # noqa: E402

IMAGE = 28                                   # the tiny LLaVA's input size (test_llava_backend)


def _ray_llm_imports() -> bool:
    return ray_vllm._ray_llm_error() is None


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    raster = write_raster(tmp_path_factory.mktemp("ray-vllm") / "r.tif", crs="EPSG:32633", width=112, height=56)
    return plan_tiles(str(raster.path), tile_px=56, overlap_px=0, model_dir=Path("."), image_size=IMAGE)


def _spec(task: str = "ground", max_tokens: int = 12) -> InferenceSpec:
    return InferenceSpec(task, None, max_tokens, None, IMAGE)


def _requests(plan, spec):
    view, spec_json = json.dumps(plan.worker_view()), json.dumps(asdict(spec))
    prompt, asked = ray_vllm.scan_prompt(spec.task, spec.question)
    rows = ray_vllm.tile_rows([plan.tiles[:1], plan.tiles[1:]])
    return view, spec_json, asked, [ray_vllm.tile_request(r, view, spec_json, prompt) for r in rows]


def test_the_processor_config_runs_one_vllm_replica_per_gpu_on_the_raw_prompt(tmp_path):
    config = ray_vllm.processor_config(tmp_path, replicas=4, batch=8)
    assert config["model_source"] == str(tmp_path) and config["concurrency"] == 4
    assert config["batch_size"] >= 8
    assert config["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 1}
    assert config["engine_kwargs"]["dtype"] == "bfloat16"
    assert not (config["chat_template_stage"] or config["tokenize_stage"] or config["detokenize_stage"])


@pytest.mark.skipif(not _ray_llm_imports(), reason="ray.data.llm does not import (pip install 'ray[llm]')")
def test_the_processor_config_is_accepted_by_ray_data_llm(tmp_path):
    from ray.data.llm import vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**ray_vllm.processor_config(tmp_path, replicas=2, batch=8))
    assert config.concurrency == 2 and config.model_source == str(tmp_path)
    assert config.engine_kwargs["max_model_len"] == 4096 and config.task_type == "generate"


def test_each_tile_row_carries_the_prompt_its_rgb_chip_and_greedy_sampling(plan):
    from PIL import Image

    _, _, asked, requests = _requests(plan, _spec("ground", 12))
    assert len(requests) == len(plan.tiles) == 2 and [r["chunk"] for r in requests] == [0, 1]
    for r in requests:
        assert r["prompt"].startswith(VICUNA_V1_SYSTEM) and r["prompt"].count("<image>") == 1
        assert r["prompt"].endswith("ASSISTANT:") and "[grounding]" in r["prompt"]
        image = r["multimodal_data"]["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (IMAGE, IMAGE)
        assert r["sampling_params"] == {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": ["USER:"],
                                        "logprobs": 0}
        assert not r["nodata"]
    assert asked == "Describe the image in detail."


def test_the_sampling_params_are_vllms_own_fields():
    vllm = pytest.importorskip("vllm")
    params = vllm.SamplingParams(**ray_vllm.sampling_params(7))
    assert params.max_tokens == 7 and params.temperature == 0.0


def test_a_completion_comes_back_as_the_tiles_georeferenced_boxes(plan):
    view, spec_json, asked, requests = _requests(plan, _spec())
    row = dict(requests[1], generated_text=" ship {<10><20><50><60>|0}", generated_tokens=[5, 6],
               num_generated_tokens=2, logprobs=[{5: {"logprob": -0.1}}, {"6": {"logprob": -0.3}}])
    out = ray_vllm.tile_result(row, view, spec_json, asked)
    result = json.loads(out["result"])
    assert out["chunk"] == 1 and result["tile_id"] == plan.tiles[1].id and result["status"] == "ok"
    (box,) = result["boxes"]
    assert box["label"] == "ship" and box["score"] == pytest.approx(np.exp(-0.2))
    assert tile_polygon(plan, plan.tiles[1]).buffer(1e-6).contains(shapely.from_wkb(box["wkb"]))
    nodata = ray_vllm.tile_result(dict(requests[0], nodata=True), view, spec_json, asked)
    assert json.loads(nodata["result"])["status"] == "nodata"


def test_asking_for_vllm_on_a_cpu_cluster_says_why_and_keeps_the_actor_pool():
    use, why = ray_vllm.vllm_choice("vllm", "llava", gpus=0)
    assert not use and why.startswith("vLLM not used for the Ray scan") and "no GPU" in why
    assert ray_vllm.vllm_choice("auto", "llava", gpus=0) == (False, None)
    assert ray_vllm.vllm_choice("transformers", "llava", gpus=8) == (False, None)
    assert "LLaVA" in ray_vllm.vllm_choice("vllm", "rs_lvlm", gpus=8)[1]


@pytest.fixture(scope="module")
def local_cluster():
    import os

    started = not ray.is_initialized()
    if started:   # workers import the engine and this folder's helpers (the stand-in engine stage)
        here = Path(__file__).resolve().parent
        path = os.pathsep.join([str(here.parents[1]), str(here)])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def _stand_in_engine(row: dict) -> dict:
    """What the vLLM stage adds to a row (generated text and tokens), after checking its inputs."""
    from PIL import Image

    image = row["multimodal_data"]["image"]
    assert isinstance(image, (Image.Image, np.ndarray)) and np.asarray(image).shape == (IMAGE, IMAGE, 3)
    assert row["prompt"].count("<image>") == 1 and row["sampling_params"]["temperature"] == 0.0
    return {**row, "generated_text": "{<0><0><50><50>|0}", "generated_tokens": [1], "num_generated_tokens": 1,
            "logprobs": None}


def test_the_ray_data_pipeline_yields_every_batch_whole_in_tile_order(plan, local_cluster, tmp_path):
    seen: dict = {}

    def build(config, preprocess, postprocess):
        seen["config"] = config
        return lambda ds: ds.map(preprocess).map(_stand_in_engine).map(postprocess)

    chunks = [plan.tiles[:1], plan.tiles[1:]]
    batches = list(ray_vllm.vllm_ray_results(ray, plan, chunks, _spec(), tmp_path, replicas=1, batch=1, build=build))
    assert sorted([r.tile_id for r in b] for b in batches) == sorted([t.id for t in c] for c in chunks)
    assert all(r.status == "ok" and len(r.boxes) == 1 and r.boxes[0]["score"] == 1.0 for b in batches for r in b)
    assert seen["config"]["model_source"] == str(tmp_path.resolve())


def test_a_ray_scan_asked_for_vllm_on_cpus_runs_the_actor_pool_and_warns(tmp_path, local_cluster):
    from engine.service import EngineService, SilentContext
    from test_llava_backend import write_tiny_llava

    model = write_tiny_llava(tmp_path / "llava")
    raster = write_raster(tmp_path / "r.tif", crs="EPSG:32633", width=56, height=56)
    result = run_scan({"raster": str(raster.path), "task": "classify", "tile": 28, "overlap": 0, "batch": 2,
                       "model": str(model), "device": "cpu", "backend": "vllm", "max_tokens": 3,
                       "out": str(tmp_path / "scan.gpkg"), "ray": True, "ray_workers": 1},
                      SilentContext(), EngineService())
    assert result["tiles"]["processed"] == 4
    assert any(w.startswith("vLLM not used for the Ray scan") for w in result["warnings"])
    assert len(read_layer(tmp_path / "scan.gpkg", "tiles")) == 4


def _gpu_vllm() -> bool:
    try:
        import torch
    except ImportError:
        return False
    from engine.backends.vllm_engine import vllm_installed

    return torch.cuda.is_available() and vllm_installed() and _ray_llm_imports()


@pytest.mark.skipif(not _gpu_vllm(), reason="needs a CUDA GPU, vllm and ray.data.llm")
def test_a_ray_scan_on_a_gpu_runs_on_the_vllm_processor(tmp_path, local_cluster):
    from engine.service import EngineService, SilentContext
    from test_llava_backend import write_tiny_llava

    model = write_tiny_llava(tmp_path / "llava")
    raster = write_raster(tmp_path / "r.tif", crs="EPSG:32633", width=56, height=56)
    result = run_scan({"raster": str(raster.path), "task": "classify", "tile": 28, "overlap": 0, "batch": 2,
                       "model": str(model), "device": "cuda", "backend": "vllm", "max_tokens": 3,
                       "out": str(tmp_path / "scan.gpkg"), "ray": True},
                      SilentContext(), EngineService())
    assert result["tiles"]["processed"] == 4 and not any("vLLM not used" in w for w in result["warnings"])
    assert len(read_layer(tmp_path / "scan.gpkg", "tiles")) == 4
