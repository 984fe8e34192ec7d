"""Tiny random-init Hugging Face Mixtral models built from configs (no downloads), for the Mixtral tests."""

from __future__ import annotations

from pathlib import Path

import torch

MIXTRAL_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                    num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, rope_theta=10000.0,
                    bos_token_id=1, eos_token_id=2)

MIXTRAL_VARIANTS = {
    "top2_of_4": {},
    # sliding window shorter than the test sequence; top-1 routing; GQA
    "swa_top1": dict(sliding_window=8, num_experts_per_tok=1),
    # 8 experts top-3, tied embeddings, odd (unaligned) dims: exercises the per-expert GEMM fallback
    "tied_top3_of_8": dict(num_local_experts=8, num_experts_per_tok=3, intermediate_size=50,
                           tie_word_embeddings=True),
}


def make_hf_mixtral(variant: str = "top2_of_4", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    # the eager (one loop over experts) implementation: an oracle independent of hibari's grouped GEMMs
    cfg = MixtralConfig(**{**MIXTRAL_TINY, **MIXTRAL_VARIANTS[variant], **overrides}, experts_implementation="eager")
    cfg.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random (non-unit) norm weights so that a swapped norm would be caught
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:  # a sharper router than init_std gives, so routing is not a coin toss
                p.normal_(0.0, 0.5)
    return model.to(dtype).eval()


def save_hf_mixtral(path: Path, variant: str = "top2_of_4", seed: int = 0, dtype=torch.float32, **kw) -> Path:
    make_hf_mixtral(variant, seed=seed, dtype=dtype, **kw).save_pretrained(str(path))
    return Path(path)
