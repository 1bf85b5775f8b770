"""Speed and memory of the engine: ``make bench`` (prints a table, writes benchmarks/results/*.json).

Measured in one run on one machine, so ratios compare like with like:
- end-to-end ``ask`` latency p50/p95 over 30+ questions on the sample raster (window read +
  vision + retrieval + generation), time to first token, decode tokens/s;
- faiss retrieval latency per query; peak RSS of the engine process; engine cold start (a fresh
  ``python -m engine serve`` until its first ``info`` reply with the model loaded);
- our generation path against plain ``transformers`` (LlavaForConditionalGeneration with an
  equivalent config and ``generate()``), same inputs, same number of new tokens, greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = [
    ("caption", None), ("classify", None), ("vqa", "How many airplanes are there?"),
    ("vqa", "Is there a ship?"), ("vqa", "What is the dominant land cover?"),
    ("vqa", "What colour is the largest building?"), ("ground", "[grounding] Locate all storage tanks."),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        model_name = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu_model"] = model_name[0].split(":", 1)[1].strip() if model_name else None
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_ask(n: int, max_tokens: int, grammar: str = "evidence") -> dict:
    """End-to-end asks through the same service the server uses, on tiles of the sample raster,
    decoded under answer grammar ``grammar`` (engine.model.referring.GRAMMARS)."""
    import rasterio

    from engine.paths import SAMPLE_RASTER
    from engine.service import EngineService

    service = EngineService()
    with rasterio.open(SAMPLE_RASTER) as ds:
        left, bottom, right, top = ds.bounds
    step = (right - left) / 3
    regions = [(left + i * step, top - (j + 1) * step, left + (i + 1) * step, top - j * step)
               for j in range(3) for i in range(3)]
    service.ask({"raster": str(SAMPLE_RASTER), "bbox": list(regions[0]), "task": "caption"})  # warm-up + load
    service.pipeline(None, None).grammar = grammar
    for task, question in QUESTIONS:   # warm: question embeddings cached, raster blocks read once
        service.ask({"raster": str(SAMPLE_RASTER), "bbox": list(regions[0]), "task": task, "question": question,
                     "max_tokens": max_tokens})
    latencies, first_tokens, rates, tokens = [], [], [], []
    for i in range(n):
        task, question = QUESTIONS[i % len(QUESTIONS)]
        t0 = time.perf_counter()
        result = service.ask({"raster": str(SAMPLE_RASTER), "bbox": list(regions[i % len(regions)]), "task": task,
                              "question": question, "max_tokens": max_tokens})
        latencies.append(time.perf_counter() - t0)
        t = result["timing"]
        if t.get("model_first_token_s") is not None:
            first_tokens.append(t["model_first_token_s"] + t.get("window_s", 0.0))
        if t.get("model_new_tokens"):
            rates.append(t["model_tokens_per_s"])
            tokens.append(t["model_new_tokens"])
    return {"n": n, "grammar": grammar, "latency_p50_ms": 1000 * percentile(latencies, 0.5),
            "latency_p95_ms": 1000 * percentile(latencies, 0.95),
            "first_token_p50_ms": 1000 * percentile(first_tokens, 0.5) if first_tokens else None,
            "decode_tokens_per_s": statistics.mean(rates) if rates else None,
            "mean_new_tokens": statistics.mean(tokens) if tokens else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_retrieval(n: int = 200) -> dict:
    import numpy as np

    from engine.knowledge import DEFAULT_INDEX_DIR, KnowledgeBase

    kb = KnowledgeBase.load(DEFAULT_INDEX_DIR)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n, kb.embeddings.shape[1])).astype("float32")
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        kb.search(q[None], 5, level="scene")
        times.append(time.perf_counter() - t0)
    return {"queries": n, "entries": int(len(kb.level_ids)), "latency_p50_us": 1e6 * percentile(times, 0.5),
            "latency_p95_us": 1e6 * percentile(times, 0.95)}


def bench_cold_start() -> dict:
    """Wall time from process start to the first info reply with the model loaded."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write(json.dumps({"id": 1, "method": "info", "params": {}}) + "\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    elapsed = time.perf_counter() - t0
    proc.stdin.write(json.dumps({"id": 2, "method": "shutdown"}) + "\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    return {"cold_start_s": elapsed, "model_loaded": bool(reply.get("result", {}).get("model", {}).get("loaded"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from benchmarks.generation_vs_transformers import bench_generation

    results = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}
    results["cold_start"] = bench_cold_start()
    results["ask"] = bench_ask(args.n, args.max_tokens)
    # the answer grammar's cost, side by side: the same asks with the grammar before it
    results["ask_grammar_classes"] = bench_ask(args.n, args.max_tokens, grammar="classes")
    results["retrieval"] = bench_retrieval()
    results["generation_vs_transformers"] = bench_generation(new_tokens=args.max_tokens)
    rows = [
        ("engine cold start (s)", results["cold_start"]["cold_start_s"]),
        ("ask latency p50 (ms)", results["ask"]["latency_p50_ms"]),
        ("ask latency p95 (ms)", results["ask"]["latency_p95_ms"]),
        ("ask p50, grammar 'classes' (ms)", results["ask_grammar_classes"]["latency_p50_ms"]),
        ("ask p95, grammar 'classes' (ms)", results["ask_grammar_classes"]["latency_p95_ms"]),
        ("time to first token p50 (ms)", results["ask"]["first_token_p50_ms"]),
        ("decode tokens/s", results["ask"]["decode_tokens_per_s"]),
        ("peak RSS (MB)", results["ask"]["peak_rss_mb"]),
        ("faiss retrieval p50 (us)", results["retrieval"]["latency_p50_us"]),
        ("ours: generate (ms)", results["generation_vs_transformers"]["ours_ms"]),
        ("transformers Llava generate (ms)", results["generation_vs_transformers"]["transformers_ms"]),
        ("speed-up vs transformers (x)", results["generation_vs_transformers"]["speedup"]),
        ("ours: prefill (ms)", results["generation_vs_transformers"]["ours_prefill_ms"]),
        ("transformers: prefill (ms)", results["generation_vs_transformers"]["transformers_prefill_ms"]),
        ("ours: decode (ms/token)", results["generation_vs_transformers"]["ours_decode_ms_per_token"]),
        ("transformers: decode (ms/token)", results["generation_vs_transformers"]["transformers_decode_ms_per_token"]),
        ("decode speed-up vs transformers (x)", results["generation_vs_transformers"]["decode_speedup"]),
        ("ours, reference path (ms)", results["generation_vs_transformers"]["ours_reference_path_ms"]),
        ("fused decode speed-up (x)", results["generation_vs_transformers"]["fused_decode_speedup"]),
        ("ours, int8 decoding (ms)", results["generation_vs_transformers"]["ours_int8_ms"]),
        ("ours int8: decode (ms/token)", results["generation_vs_transformers"]["ours_int8_decode_ms_per_token"]),
        ("int8 speed-up vs transformers (x)", results["generation_vs_transformers"]["int8_speedup_vs_transformers"]),
    ]
    print(f"{'metric':<36}{'value':>12}")
    for name, value in rows:
        print(f"{name:<36}{value:>12.2f}" if isinstance(value, (int, float)) else f"{name:<36}{'n/a':>12}")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if "gpu" in results["machine"] else "cpu"
    path = args.out / f"bench_{tag}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
