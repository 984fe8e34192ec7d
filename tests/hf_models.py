"""Tiny random-init Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                   max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    # Llama 2: multi-head attention, untied, theta 1e4
    "llama2_mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)),
    # Llama 3.1: grouped-query attention, big theta, llama3 rope scaling
    "llama3_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Mistral: GQA + sliding window shorter than the test sequence
    "mistral_swa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                    rope_theta=10000.0)),
    # tied input/output embeddings
    "llama_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_hf_model(variant: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kind, extra = VARIANTS[variant]
    kwargs = {**TINY_COMMON, **extra, **overrides}
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(**kwargs)
        cfg.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(cfg)
    else:
        cfg = MistralConfig(**kwargs)
        cfg.architectures = ["MistralForCausalLM"]
        model = MistralForCausalLM(cfg)
    # random (non-unit) norm weights so that a swapped norm would be caught
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def save_hf_model(variant: str, path: Path, seed: int = 0, dtype=torch.float32, **kw) -> Path:
    model = make_hf_model(variant, seed=seed, dtype=dtype, **kw)
    model.save_pretrained(str(path))
    return Path(path)
