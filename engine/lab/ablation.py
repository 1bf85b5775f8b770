"""Ablation of the paper's components: ``python -m engine.lab.ablation``.

Four variants — baseline (no SAM, no experts), +SAM, +experts, full — are trained from the same
config, data and time budget, each with several seeds, and evaluated on the same fresh split.
The same wall-clock budget for all four is the fair comparison on a CPU: a component that costs
time must pay for itself within it.  Each run is scored with the product's answer grammar
(``evidence``) and with ``classes`` only (``model_only`` in the results), so that what the grammar
adds on top of every variant does not hide the differences between them.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("engine.lab.ablation")

VARIANTS = {
    "baseline": {"use_sam": False, "use_experts": False},
    "+sam": {"use_sam": True, "use_experts": False},
    "+experts": {"use_sam": False, "use_experts": True},
    "full": {"use_sam": True, "use_experts": True},
}
METRICS = ("scene_accuracy", "vqa_accuracy", "grounding_acc50", "grounding_acc70", "grounding_mean_iou",
           "caption_bleu4", "caption_cider")


def run(config_path: Path, budget_min: float, seeds: list[int], n_eval: int, eval_seed: int,
        runs_dir: Path, variants: list[str], tokenizer_from: Path | None = None) -> dict:
    import torch

    from .evaluate import evaluate
    from .train import TrainConfig, train

    results: dict = {"budget_min": budget_min, "seeds": seeds, "n_eval": n_eval, "eval_seed": eval_seed,
                     "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                                 "torch_threads": torch.get_num_threads()},
                     "runs": []}
    for variant in variants:
        for seed in seeds:
            base = TrainConfig.from_file(config_path)
            # The detector's warm-up keeps its share of the run at any budget.
            warmup = base.detector_warmup_min * budget_min / max(base.time_budget_min, 1e-9)
            config = TrainConfig.from_file(config_path, time_budget_min=budget_min, seed=seed, data_seed=seed,
                                           detector_warmup_min=warmup, **VARIANTS[variant])
            name = f"{variant.replace('+', 'plus-')}-s{seed}"
            state_dir = runs_dir / name / "state"
            if tokenizer_from is not None and (tokenizer_from / "tokenizer.json").is_file():
                # One tokenizer for all runs: the variants then differ only in their switches.
                state_dir.mkdir(parents=True, exist_ok=True)
                for f in tokenizer_from.glob("tokenizer*.json"):
                    shutil.copy(f, state_dir / f.name)
            t0 = time.perf_counter()
            summary = train(config, runs_dir / name / "model", state_dir, resume=True)
            scores = evaluate(runs_dir / name / "model", seed=eval_seed, n=n_eval, progress=False)
            own = evaluate(runs_dir / name / "model", seed=eval_seed, n=n_eval, progress=False, grammar="classes")
            results["runs"].append({"variant": variant, "seed": seed, "steps": summary["steps"],
                                    "minutes": round((time.perf_counter() - t0) / 60, 1),
                                    **{m: scores.get(m) for m in METRICS},
                                    "retrieval_hit_rate": scores.get("retrieval_hit_rate"),
                                    "retrieval_asked": scores.get("retrieval_asked"),
                                    "vqa_per_type": scores.get("vqa_per_type"),
                                    "model_only": {m: own.get(m) for m in METRICS},
                                    "model_only_vqa_per_type": own.get("vqa_per_type")})
            log.info("%s seed %d: %s", variant, seed, {m: scores.get(m) for m in METRICS})
    results["summary"] = summarise(results["runs"])
    results["summary_model_only"] = summarise(results["runs"], "model_only")
    return results


def summarise(runs: list[dict], key: str | None = None) -> dict:
    """Mean and standard deviation over seeds, per variant and metric (of ``run[key]`` when
    given, e.g. ``model_only``)."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [(r.get(key) or {}) if key else r for r in runs if r["variant"] == variant]
        out[variant] = {}
        for m in METRICS:
            values = [r[m] for r in rows if r.get(m) is not None]
            if values:
                out[variant][m] = {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}
    return out


def merge(paths: list[Path]) -> dict:
    """One result from the result files of runs done side by side (e.g. one process per seed)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for p in parts for r in p["runs"]]
    return {**parts[0], "seeds": sorted({s for p in parts for s in p["seeds"]}), "runs": runs,
            "merged_from": [str(p) for p in paths], "summary": summarise(runs),
            "summary_model_only": summarise(runs, "model_only")}


def markdown_table(results: dict, key: str = "summary") -> str:
    header = "| variant | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    lines = []
    for variant, metrics in results.get(key, {}).items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m in metrics else "–" for m in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m engine.lab.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.json"))
    parser.add_argument("--budget-min", type=float, default=6.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--out", type=Path, default=Path("docs/ablation.json"))
    parser.add_argument("--tokenizer-from", type=Path, default=Path("resources/model"),
                        help="reuse this checkpoint's tokenizer for every run")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="only merge result files of runs done in parallel (e.g. one process per seed)")
    args = parser.parse_args(argv)
    if args.merge:
        results = merge(args.merge)
    else:
        results = run(args.config, args.budget_min, args.seeds, args.n, args.eval_seed, args.runs_dir, args.variants,
                      args.tokenizer_from)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(markdown_table(results, "summary_model_only"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
