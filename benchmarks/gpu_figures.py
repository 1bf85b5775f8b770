"""Every GPU figure of issue 15 in one run on one GPU (a few minutes on an H200).

A random-weight LLaVA-1.5-7B-shaped model (Llama 4096 / 11008 / 32 layers, CLIP-L 336 px, 576
image tokens) in bfloat16, measured three ways on the same shapes, the same image and prompt:

* ``transformers``: ``LlavaForConditionalGeneration.generate`` (greedy, EOS off);
* ``fused``: this engine's LLaVA pipeline (``engine.backends.llava``: transformers' prefill, then
  the fused static-cache decode step of ``engine.model.fast_decode``);
* ``vllm``: vLLM's ``LLM`` with ``load_format="dummy"`` (random weights, no file read), in its own
  subprocess; recorded as skipped, with the reason, where vllm does not import or there is no CUDA.

For each: the time to the first token with one 336 px image (the wall time of a one-token answer,
image preprocessing included), decode tokens/s at batch 1 and 8 (``(T(n) - T(1)) / (n - 1)`` per
step; per sequence and summed over the batch), the HBM roofline fraction at batch 1 (bytes of the
weights one decode step reads x tokens/s / the GPU's bandwidth, 4.8e12 B/s for an H200), and the
tiles/s of a classify scan over a sample GeoTIFF (the scan's own batch function,
``engine.scan.runner.infer_batch``: windowed read, batched answer, georeferencing; the writer left
out).  The model is built in memory directly on the device; only its config, tokenizer (the test
character tokenizer padded to the 32k vocabulary, so every id decodes) and image processor are
written, for vLLM.

``--tiny`` runs the same code on a tiny model (float32 on the CPU without CUDA) in seconds: it is
what the test runs, so the script is known to work before a GPU is lent.  Writes
``benchmarks/results/gpu_figures.json`` (``--tiny``: ``runs/gpu_figures_tiny.json``).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "engine"))

from benchmarks.bench_llava import SEVEN_B, VISION_CLIP_L, llava_config  # noqa: E402

H200_HBM_BYTES_PER_S = 4.8e12
TINY_TEXT = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=32064)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
QUESTION = "How many ships are in the harbour?"
SIZES = {   # new tokens, repeats, scan (grid rows, cols), scan batch, scan max tokens
    "full": dict(new_tokens=33, repeats=2, grid=(4, 4), scan_batch=8, scan_tokens=16, batches=(1, 8)),
    "tiny": dict(new_tokens=17, repeats=3, grid=(1, 2), scan_batch=2, scan_tokens=3, batches=(1, 8)),
}


# -- the model and its folder ------------------------------------------------------------------
def write_folder(folder: Path, text: dict, vision: dict):
    """config.json, a tokenizer covering the whole vocabulary and an image processor (no weights)."""
    from test_llava_backend import char_tokenizer
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = char_tokenizer()
    tok.add_tokens([f"<x{i}>" for i in range(len(tok), text["vocab_size"])])
    config = llava_config(dict(text, vocab_size=len(tok)), vision, len(tok), tok.convert_tokens_to_ids("<image>"))
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return config, tok


def build_model(config, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlavaForConditionalGeneration made on ``device`` (no file, no CPU copy)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def decode_weight_bytes(config, bytes_per_param: int) -> int:
    """Bytes of the weights one decode step reads: the language model and its head, not the
    embedding table (one row per token) nor the vision tower (prefill only)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    lm = model.model.language_model
    n = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    if model.lm_head.weight is not lm.embed_tokens.weight:
        n += model.lm_head.weight.numel()
    return n * bytes_per_param


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8)


# -- timing ------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (device synchronised)."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def figures(run: Callable[[int, int], Any], size: dict, weight_bytes: int, hbm: float) -> dict:
    """TTFT, decode tokens/s at each batch and the batch-1 roofline fraction of one engine.

    ``run(batch, new_tokens)`` answers ``batch`` copies of the image with exactly ``new_tokens``."""
    n, repeats = size["new_tokens"], size["repeats"]
    out: dict = {"ttft_s": round(best_of(lambda: run(1, 1), repeats), 4)}
    for b in size["batches"]:
        one = best_of(lambda: run(b, 1), repeats)
        full = best_of(lambda: run(b, n), repeats)
        if full <= one:   # timer noise larger than the decode (a loaded machine): no figure rather than a wrong one
            out[f"b{b}_decode_ms_per_step"] = None
            out[f"b{b}_decode_tokens_per_s_per_sequence"] = out[f"b{b}_decode_tokens_per_s_total"] = None
            continue
        step = (full - one) / (n - 1)
        out[f"b{b}_decode_ms_per_step"] = round(step * 1000, 3)
        out[f"b{b}_decode_tokens_per_s_per_sequence"] = round(1 / step, 2)
        out[f"b{b}_decode_tokens_per_s_total"] = round(b / step, 2)
    rate = out["b1_decode_tokens_per_s_per_sequence"]
    out["b1_roofline_fraction"] = None if rate is None else round(weight_bytes * rate / hbm, 4)
    return out


def scan_tiles_per_s(pipeline: Any, raster: Path, tile_px: int, size: dict, model_dir: Path) -> dict:
    """Tiles/s of a classify scan's batches through ``pipeline`` (after one warm-up batch)."""
    from engine.scan.runner import InferenceSpec, local_results
    from engine.scan.tiling import plan_tiles

    image_size = int(pipeline.image_size)
    plan = plan_tiles(str(raster), tile_px=tile_px, overlap_px=0, model_dir=model_dir, image_size=image_size)
    spec = InferenceSpec("classify", None, size["scan_tokens"], None, image_size)
    chunks = [plan.tiles[i:i + size["scan_batch"]] for i in range(0, len(plan.tiles), size["scan_batch"])]
    list(local_results(pipeline, plan, chunks[:1], spec, lambda: False))
    _sync()
    t0 = time.perf_counter()
    results = [r for batch in local_results(pipeline, plan, chunks, spec, lambda: False) for r in batch]
    _sync()
    elapsed = time.perf_counter() - t0
    return {"tiles": len(results), "tile_px": tile_px, "batch": size["scan_batch"], "max_tokens": size["scan_tokens"],
            "tiles_per_s": round(len(results) / elapsed, 3), "ok": sum(r.status == "ok" for r in results)}


def _guarded(fn: Callable[[], dict]) -> dict:
    try:
        return {"status": "ok", **fn()}
    except Exception as exc:   # one part failing must not lose the others' figures
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}


# -- the three engines -------------------------------------------------------------------------
def torch_parts(folder: Path, config, tok, device: str, dtype: torch.dtype, size: dict, raster: Path,
                tile_px: int, weight_bytes: int, hbm: float) -> dict:
    """transformers generate and our fused pipeline on one in-memory model."""
    from engine.backends.llava import LlavaPipeline, build_instruction
    from engine.model.image_processing import preprocess_images

    model = build_model(config, device, dtype)
    pipeline = LlavaPipeline(model, tok, config, device, folder, dtype)
    pipeline.eos_ids = set()                         # exactly the asked number of tokens on every path
    ids = pipeline.prompt_ids(build_instruction("vqa", QUESTION)[0])
    banned = pipeline._banned.tolist()

    @torch.inference_mode()
    def hf(batch: int, n: int) -> None:
        pixels = preprocess_images([image()] * batch, pipeline.image_size, pipeline.image_mean, pipeline.image_std)
        model.generate(input_ids=torch.tensor([ids] * batch, device=device), pixel_values=pixels.to(device, dtype),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=banned or None)

    def ours(batch: int, n: int) -> None:
        pipeline.answer([image()] * batch, "vqa", QUESTION, max_new_tokens=n)

    out = {"prompt_tokens": len(ids),
           "transformers": _guarded(lambda: {**figures(hf, size, weight_bytes, hbm), "scan": {"status": "skipped",
                                             "reason": "a scan runs through the engine's pipelines (fused, vllm)"}}),
           "fused": _guarded(lambda: {**figures(ours, size, weight_bytes, hbm),
                                      "scan": _guarded(lambda: scan_tiles_per_s(pipeline, raster, tile_px, size,
                                                                                folder))})}
    if torch.cuda.is_available():
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    pipeline = model = None    # free the GPU for vLLM's process
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def vllm_part(folder: Path, size: dict, raster: Path, tile_px: int, weight_bytes: int, hbm: float) -> dict:
    """vLLM on random weights (``load_format="dummy"``): run in its own process by :func:`main`."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    from engine.backends.llava import build_instruction, vicuna_v1_prompt
    from engine.backends.vllm_engine import VllmPipeline

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", dtype="bfloat16", max_model_len=2048, seed=0,
              limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.85)
    load_s = time.perf_counter() - t0
    prompt = vicuna_v1_prompt(build_instruction("vqa", QUESTION)[0])
    picture = Image.fromarray(image())

    def run(batch: int, n: int) -> None:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": picture}}] * batch, params, use_tqdm=False)

    pipeline = VllmPipeline(llm, folder, 336, "bfloat16")
    return {"load_s": round(load_s, 1), **figures(run, size, weight_bytes, hbm),
            "scan": _guarded(lambda: scan_tiles_per_s(pipeline, raster, tile_px, size, folder))}


def vllm_skip_reason() -> str | None:
    import importlib.util

    if not torch.cuda.is_available():
        return "no CUDA GPU (vLLM runs on CUDA only)"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install -r requirements/engine-vllm.txt)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (seconds, CPU without CUDA): the smoke test")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_figures")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--hbm-bytes-per-s", type=float, default=H200_HBM_BYTES_PER_S)
    parser.add_argument("--vllm-timeout", type=int, default=420)
    parser.add_argument("--vllm-part", nargs=2, metavar=("MODE", "WEIGHT_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "full"
    size = SIZES[mode]
    folder, raster = args.work / f"llava-{mode}", args.work / f"scan-{mode}.tif"
    tile_px = 336
    if args.vllm_part:                     # the vLLM subprocess: one JSON line on stdout
        mode, weight_bytes = args.vllm_part[0], int(args.vllm_part[1])
        print(json.dumps(_guarded(lambda: vllm_part(args.work / f"llava-{mode}", SIZES[mode],
                                                    args.work / f"scan-{mode}.tif", tile_px, weight_bytes,
                                                    args.hbm_bytes_per_s))))
        return 0

    from benchmarks.run_benchmarks import machine_info
    from engine.data.sample_raster import write_sample_geotiff

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    text, vision = (TINY_TEXT, TINY_VISION) if args.tiny else (SEVEN_B, VISION_CLIP_L)
    config, tok = write_folder(folder, text, vision)
    write_sample_geotiff(raster, seed=3, grid=size["grid"], tile=tile_px)
    weight_bytes = decode_weight_bytes(config, 2 if dtype == torch.bfloat16 else 4)
    results: dict = {"machine": machine_info(), "mode": mode, "device": device,
                     "dtype": str(dtype).replace("torch.", ""),
                     "model": {"text": text, "vision": vision, "image_px": 336, "image_tokens": 576,
                               "decode_weight_bytes": weight_bytes},
                     "hbm_bytes_per_s": args.hbm_bytes_per_s, "new_tokens": size["new_tokens"],
                     "question": QUESTION}
    if device != "cuda":
        results["note"] = "no CUDA device: these are CPU figures of the code path, not GPU figures"
    results.update(torch_parts(folder, config, tok, device, dtype, size, raster, tile_px, weight_bytes,
                               args.hbm_bytes_per_s))
    reason = vllm_skip_reason()
    if reason:
        results["vllm"] = {"status": "skipped", "reason": reason}
    else:
        try:
            proc = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--hbm-bytes-per-s",
                                   str(args.hbm_bytes_per_s), "--vllm-part", mode, str(weight_bytes)],
                                  capture_output=True, text=True, timeout=args.vllm_timeout, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            results["vllm"] = json.loads(lines[-1]) if lines else {
                "status": "error", "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        except subprocess.TimeoutExpired:
            results["vllm"] = {"status": "error", "error": f"timed out after {args.vllm_timeout} s"}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = args.out or (ROOT / "runs" / "gpu_figures_tiny.json" if args.tiny else
                       ROOT / "benchmarks" / "results" / "gpu_figures.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'engine':<14}{'TTFT s':>9}{'b1 tok/s':>10}{'b8 tok/s':>10}{'roofline':>10}{'tiles/s':>9}")
    for name in ("transformers", "fused", "vllm"):
        r = results.get(name, {})
        if r.get("status") != "ok":
            print(f"{name:<14}{r.get('status')}: {r.get('reason') or r.get('error')}")
            continue
        scan = r.get("scan", {})
        cells = [r.get("ttft_s"), r.get("b1_decode_tokens_per_s_per_sequence"), r.get("b8_decode_tokens_per_s_total"),
                 r.get("b1_roofline_fraction"), scan.get("tiles_per_s")]
        text = ["-" if v is None else str(v) for v in cells]   # None: timer noise larger than the decode
        print(f"{name:<14}{text[0]:>9}{text[1]:>10}{text[2]:>10}{text[3]:>10}{text[4]:>9}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
