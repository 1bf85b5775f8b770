"""LLaVA-family weights on the CPU: our pipeline (fused decode, shared loop) against plain
``transformers`` generate on the same weights, prefill and decode apart; and the memory and speed
of a 7B in bfloat16 and in weight-only int8.

The small model has a 7B's shape ratios scaled down (``SMALL``: hidden : intermediate as
4096 : 11008, a 7B's head size of 128, its 32k vocabulary) and CLIP-L's 336 px / patch 14 image
(576 image tokens), random weights.  ``--seven-b DIR`` builds (once) a random-weight LLaVA-1.5-7B-shaped
folder shard by shard on the meta device, then measures loading RSS, the time to the first
token with one 336 px image, and decode tokens/s, in a fresh subprocess per precision so that
one measurement's memory cannot leak into the next.

The small model is also measured with ``--precision int8`` (weight-only int8 language model),
its decode on the fused step (``int8_cpu.Int8FusedDecoder``) and module by module.

Writes ``benchmarks/results/llava_cpu.json`` and prints a table.  Ratios are measured side by
side in one run; the machine and thread count are recorded with them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "engine"))

from benchmarks.generation_vs_transformers import _time  # noqa: E402  (best of N after a warm-up)

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=32000)
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064)
VISION_SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
VISION_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


def llava_config(text: dict, vision: dict, vocab_size: int, image_token: int):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(vision, model_type="clip_vision_model", image_size=336, patch_size=14,
                           projection_dim=768, hidden_act="quick_gelu"),
        text_config=dict(text, model_type="llama", vocab_size=vocab_size, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_token, image_seq_length=576, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default")


def write_llava(folder: Path, text: dict, vision: dict, seed: int = 0) -> Path:
    """A random-weight LLaVA folder in the transformers layout, shard by shard (meta device first)."""
    from safetensors.torch import save_file
    from test_llava_backend import char_tokenizer
    from transformers import LlavaForConditionalGeneration

    if (folder / "config.json").is_file():
        return folder
    tok = char_tokenizer()
    vocab = max(text["vocab_size"], len(tok))
    config = llava_config(dict(text, vocab_size=vocab), vision, vocab, tok.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    names = [name for name, _ in model.state_dict().items()]
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    for name in names:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shape = shapes[name]
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("layer_norm1.weight") \
                or name.endswith("layer_norm2.weight") or name.endswith("pre_layrnorm.weight") \
                or name.endswith("post_layernorm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes > 2 * 1024 ** 3:
            n += 1
            save_file(shard, folder / f"model-{n:05d}.safetensors")
            index.update({k: f"model-{n:05d}.safetensors" for k in shard})
            shard, shard_bytes = {}, 0
            gc.collect()
    if shard:
        n += 1
        save_file(shard, folder / f"model-{n:05d}.safetensors")
        index.update({k: f"model-{n:05d}.safetensors" for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8)


@torch.inference_mode()
def bench_small(folder: Path, new_tokens: int = 24, repeats: int = 3) -> dict:
    """Ours vs transformers generate on the same small weights: prefill and decode, batch 1 and 8."""
    from engine.backends import load_pipeline
    from engine.backends.llava import build_instruction
    from engine.model.image_processing import preprocess_images

    pipeline = load_pipeline(folder, "cpu")
    int8 = load_pipeline(folder, "cpu", dtype="int8")  # weight-only int8 LM, fused step on its int8 modules
    pipeline.eos_ids = int8.eos_ids = set()            # exactly new_tokens tokens on both sides
    ids = pipeline.prompt_ids(build_instruction("vqa", "How many ships are in the harbour?")[0])
    out: dict = {"prompt_tokens": len(ids), "new_tokens": new_tokens}
    for batch in (1, 8):
        images = [_image()] * batch
        pixels = preprocess_images(images, pipeline.image_size, pipeline.image_mean, pipeline.image_std)
        input_ids = torch.tensor([ids] * batch)
        banned = pipeline._banned.tolist()

        def hf(n: int) -> None:
            pipeline.model.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, suppress_tokens=banned)

        def ours(n: int, fused: bool = True, p=pipeline) -> None:
            p.fused_decode = fused
            p.answer(images, "vqa", "How many ships are in the harbour?", max_new_tokens=n)

        rows = {"transformers": (lambda n: hf(n)), "ours": (lambda n: ours(n)),
                "ours_unfused": (lambda n: ours(n, fused=False)),
                "ours_int8": (lambda n: ours(n, p=int8)),
                "ours_int8_unfused": (lambda n: ours(n, fused=False, p=int8))}
        for name, fn in rows.items():
            prefill = _time(lambda: fn(1), repeats)
            total = _time(lambda: fn(new_tokens), repeats)
            out[f"b{batch}_{name}_prefill_ms"] = round(prefill * 1000, 1)
            out[f"b{batch}_{name}_decode_ms_per_token"] = round((total - prefill) / (new_tokens - 1) * 1000, 2)
        pipeline.fused_decode = int8.fused_decode = True
        for name in ("ours", "ours_int8"):
            suffix = "" if name == "ours" else "_int8"
            out[f"b{batch}_decode_speedup{suffix}_vs_transformers"] = round(
                out[f"b{batch}_transformers_decode_ms_per_token"] / out[f"b{batch}_{name}_decode_ms_per_token"], 2)
    return out


def _rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


@torch.inference_mode()
def bench_7b_one(folder: Path, precision: str, new_tokens: int) -> dict:
    """One precision of the random 7B, in this (fresh) process: load RSS, TTFT, decode tokens/s."""
    from engine.backends import load_pipeline

    t0 = time.perf_counter()
    pipeline = load_pipeline(folder, "cpu", dtype=precision)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_peak_gb()
    pipeline.eos_ids = set()
    first: list[float] = []
    t1 = time.perf_counter()
    pipeline.answer([_image()], "vqa", "How many ships are there?", max_new_tokens=new_tokens,
                    on_token=lambda _r, _p: first.append(time.perf_counter()) if not first else None)
    total = time.perf_counter() - t1
    ttft = (first[0] - t1) if first else total
    return {"precision": precision, "load_s": round(load_s, 1), "peak_rss_after_load_gb": round(rss_loaded, 2),
            "peak_rss_gb": round(_rss_peak_gb(), 2), "ttft_s": round(ttft, 2),
            "decode_tokens_per_s": round((new_tokens - 1) / max(total - ttft, 1e-9), 3),
            "memory_estimate": pipeline.memory}


def bench_7b(folder: Path, new_tokens: int) -> list[dict]:
    write_llava(folder, SEVEN_B, VISION_CLIP_L)
    rows = []
    for precision in ("int8", "bfloat16"):
        proc = subprocess.run([sys.executable, __file__, "--one-7b", str(folder), precision, str(new_tokens)],
                              capture_output=True, text=True, env=dict(os.environ, RS_LVLM_SKIP_MEMORY_CHECK="1"))
        if proc.returncode != 0:
            rows.append({"precision": precision, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_llava")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seven-b", action="store_true", help="also build and measure a random-weight 7B")
    parser.add_argument("--one-7b", nargs=3, metavar=("DIR", "PRECISION", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llava_cpu.json")
    args = parser.parse_args(argv)
    if args.one_7b:
        folder, precision, tokens = args.one_7b
        print(json.dumps(bench_7b_one(Path(folder), precision, int(tokens))))
        return 0
    from benchmarks.run_benchmarks import machine_info

    results: dict = {"machine": machine_info(), "threads": torch.get_num_threads()}
    small = write_llava(args.work / "small-7b-shape", SMALL, VISION_SMALL)
    results["small_llava"] = {"text": SMALL, "vision": VISION_SMALL, **bench_small(small, args.new_tokens)}
    if args.seven_b:
        results["random_7b"] = bench_7b(args.work / "random-7b", min(args.new_tokens, 8))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["small_llava"]
    print(f"{'LLaVA (7B shape ratios, small), CPU':<52}{'ours':>10}{'transformers':>14}")
    for b in (1, 8):
        print(f"{f'batch {b}: prefill (ms)':<52}{s[f'b{b}_ours_prefill_ms']:>10}{s[f'b{b}_transformers_prefill_ms']:>14}")
        print(f"{f'batch {b}: decode (ms/token)':<52}{s[f'b{b}_ours_decode_ms_per_token']:>10}"
              f"{s[f'b{b}_transformers_decode_ms_per_token']:>14}")
        print(f"{f'batch {b}: decode speed-up (x)':<52}{s[f'b{b}_decode_speedup_vs_transformers']:>10}")
        print(f"{f'batch {b}: int8 decode fused / module-by-module (ms/token)':<52}"
              f"{s[f'b{b}_ours_int8_decode_ms_per_token']:>10}{s[f'b{b}_ours_int8_unfused_decode_ms_per_token']:>14}")
    for row in results.get("random_7b", []):
        print(json.dumps(row))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
