"""benchmarks/gpu_figures.py runs end to end with ``--tiny`` (seconds on a CPU), so that the one
GPU run it exists for is known to work before a GPU is lent: every part recorded, the figures of
each engine present, vLLM recorded as skipped with its reason where it cannot run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_figures_script_records_every_part_on_a_tiny_model(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_figures.py"), "--tiny", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["mode"] == "tiny" and figures["prompt_tokens"] > 576          # one 336 px image + the question
    assert figures["model"]["decode_weight_bytes"] > 0
    for engine in ("transformers", "fused"):
        part = figures[engine]
        assert part["status"] == "ok", part
        assert part["ttft_s"] > 0
        for key in ("b1_decode_tokens_per_s_per_sequence", "b8_decode_tokens_per_s_total", "b1_roofline_fraction"):
            assert key in part
    assert figures["fused"]["scan"]["status"] == "ok" and figures["fused"]["scan"]["tiles_per_s"] > 0
    assert figures["fused"]["scan"]["ok"] == figures["fused"]["scan"]["tiles"] == 2
    vllm = figures["vllm"]
    if not torch.cuda.is_available():
        assert vllm == {"status": "skipped", "reason": "no CUDA GPU (vLLM runs on CUDA only)"}
    else:
        assert vllm["status"] in ("ok", "skipped", "error") and (vllm["status"] == "ok" or vllm.get("reason")
                                                                 or vllm.get("error"))
    assert str(out) in proc.stdout
