"""Our generation path against the plain ``transformers`` path a user would otherwise take.

Both models have the embedded ``tiny`` shape with random weights: ours (multi-level ViT, SAM,
experts) and a LlavaForConditionalGeneration with the same vision width/depth, the same Llama
width/depth/heads and vocabulary. Same image, same text prompt, greedy, exactly the same number
of new tokens (end-of-sequence disabled on both), timed in the same process, best of N.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def bench_generation(new_tokens: int = 20, prompt_tokens: int = 24, repeats: int = 5, seed: int = 0) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from engine.model.config import RsLvlmConfig
    from engine.backends.rs_lvlm import generate
    from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration

    torch.manual_seed(seed)
    cfg = RsLvlmConfig.preset("tiny")
    n_entries = 235
    ours = RsLvlmForConditionalGeneration.build(
        cfg, torch.nn.functional.normalize(torch.randn(n_entries, cfg.knowledge_dim), dim=-1),
        torch.randint(0, 3, (n_entries,)), device="cpu").eval()
    ours.config.eos_token_id = -1  # never stop early: exactly new_tokens tokens
    pixel_values = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    text = torch.randint(10, cfg.vocab_size, (1, prompt_tokens))
    ours_ids = torch.cat([torch.tensor([[cfg.bos_token_id, cfg.image_token_id]]), text], dim=1)
    q = torch.nn.functional.normalize(torch.randn(1, cfg.knowledge_dim), dim=-1)

    def run_ours(n: int = new_tokens, fast: bool = True, int8: bool = False):
        result = generate(ours, pixel_values, ours_ids, torch.ones_like(ours_ids), q, max_new_tokens=n, fast=fast,
                          int8=int8)
        assert len(result.sequences[0]) == n

    llava_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
                                       num_hidden_layers=cfg.vision_num_layers, num_attention_heads=cfg.vision_num_heads,
                                       image_size=cfg.image_size, patch_size=cfg.patch_size),
        text_config=LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                                tie_word_embeddings=True),
        image_token_index=cfg.image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(llava_cfg).eval()
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    llava_ids = torch.cat([torch.tensor([[cfg.bos_token_id] + [cfg.image_token_id] * n_image]), text], dim=1)

    def run_transformers(n: int = new_tokens):
        out = llava.generate(input_ids=llava_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(llava_ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=cfg.pad_token_id, eos_token_id=None)
        assert out.shape[1] - llava_ids.shape[1] == n

    ours_s = _time(run_ours, repeats)
    hf_s = _time(run_transformers, repeats)
    reference_s = _time(lambda: run_ours(fast=False), repeats)
    int8_s = _time(lambda: run_ours(int8=True), repeats)
    # Prefill alone (one new token), so that the decode step can be compared on its own.
    ours_pre = _time(lambda: run_ours(1), repeats)
    hf_pre = _time(lambda: run_transformers(1), repeats)
    def per_token(total_s: float, prefill_s: float) -> float:
        return (total_s - prefill_s) / max(new_tokens - 1, 1)

    ours_step, hf_step = per_token(ours_s, ours_pre), per_token(hf_s, hf_pre)
    return {"new_tokens": new_tokens, "prompt_text_tokens": prompt_tokens, "repeats": repeats,
            "ours_ms": 1000 * ours_s, "transformers_ms": 1000 * hf_s, "speedup": hf_s / ours_s,
            "ours_reference_path_ms": 1000 * reference_s, "fused_decode_speedup": reference_s / ours_s,
            "ours_prefill_ms": 1000 * ours_pre, "transformers_prefill_ms": 1000 * hf_pre,
            "ours_decode_ms_per_token": 1000 * ours_step, "transformers_decode_ms_per_token": 1000 * hf_step,
            "decode_speedup": hf_step / ours_step if ours_step > 0 else None,
            "ours_int8_ms": 1000 * int8_s, "int8_speedup_vs_transformers": hf_s / int8_s,
            "ours_int8_decode_ms_per_token": 1000 * per_token(int8_s, ours_pre),
            "ours_parameters": sum(p.numel() for p in ours.parameters()),
            "transformers_parameters": sum(p.numel() for p in llava.parameters()),
            "ours_visual_tokens": ours.num_visual_tokens if hasattr(ours, "num_visual_tokens") else None,
            "transformers_visual_tokens": n_image, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import json

    print(json.dumps(bench_generation(), indent=2))
