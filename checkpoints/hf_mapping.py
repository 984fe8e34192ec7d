"""Hugging Face Llama/Mistral <-> hibari: config translation and tensor-name mapping.

No tensor is transformed, only renamed: hibari's model uses the same rotate-half RoPE layout and separate
projections as transformers, which is what makes the HF -> hibari -> HF round trip bit-exact.
"""

from __future__ import annotations

import re

from hibari.errors import HibariError
from megatron_ext.models.llama import ModelArgs, RopeScaling

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_ARCH_TO_HF = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# hibari name <- HF name, per block
_BLOCK_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_BLOCK_MAP = {v: k for k, v in _BLOCK_MAP.items()}
_GLOBAL_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_HF_GLOBAL_MAP = {v: k for k, v in _GLOBAL_MAP.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_to_hibari_name(name: str) -> str | None:
    """HF tensor name -> hibari name; None for tensors hibari does not keep (rotary caches)."""
    if name in _HF_GLOBAL_MAP:
        return _HF_GLOBAL_MAP[name]
    m = _HF_BLOCK_RE.match(name)
    if m and m.group(2) in _HF_BLOCK_MAP:
        return f"layers.{m.group(1)}.{_HF_BLOCK_MAP[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise HibariError(f"unexpected tensor {name!r} in the HF checkpoint (not part of a Llama/Mistral model)")


def hibari_to_hf_name(name: str) -> str:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_MAP:
        return f"model.layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    raise HibariError(f"unexpected tensor {name!r} in the hibari checkpoint")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every hibari tensor name and its shape for this architecture (tied models have no `output.weight`)."""
    hd, d = args.head_dim, args.dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.ffn_hidden_dim, d),
            p + "feed_forward.w3.weight": (args.ffn_hidden_dim, d),
            p + "feed_forward.w2.weight": (d, args.ffn_hidden_dim),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def _rope_from_hf(cfg: dict, source: str) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}  # transformers >= 5
    scaling = cfg.get("rope_scaling") or {}  # transformers 4.x
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope = {**scaling, **params}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise HibariError(f"{source}: rope type {rope_type!r} not supported (supported: default, llama3)")
    return float(theta), RopeScaling(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"])


def model_args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        mt = cfg.get("model_type")
        if not archs and mt in ("llama", "mistral"):
            arch = mt
        else:
            raise HibariError(f"{source}: architectures {archs or mt!r} not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise HibariError(f"{source}: {key}=true is not supported (Llama/Mistral use bias-free projections)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HibariError(f"{source}: hidden_act {act!r} not supported (expected 'silu')")
    try:
        theta, scaling = _rope_from_hf(cfg, source)
        n_heads = cfg["num_attention_heads"]
        return ModelArgs(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            ffn_hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            sliding_window=cfg.get("sliding_window") if arch == "mistral" else None,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=cfg.get("initializer_range", 0.02),
        )
    except KeyError as err:
        raise HibariError(f"{source}: missing field {err.args[0]!r}") from None
    except ValueError as err:  # pydantic validation
        raise HibariError(f"{source}: invalid architecture ({str(err).splitlines()[-1].strip()})") from None


def hf_config_from_model_args(args: ModelArgs, base: dict | None = None, dtype: str = "bfloat16") -> dict:
    """An HF config.json for `args`; fields of the original config (`base`) not owned by hibari are kept."""
    cfg = dict(base or {})
    for stale in ("rope_scaling", "_name_or_path", "transformers_version"):
        cfg.pop(stale, None)
    rope: dict = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.rope_scaling is not None:
        rs = args.rope_scaling
        rope = {"rope_theta": args.rope_theta, "rope_type": "llama3", "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}
    cfg.update({
        "architectures": [_ARCH_TO_HF[args.arch]],
        "model_type": args.arch,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
        "dtype": dtype,
        "torch_dtype": dtype,
    })
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if args.arch == "mistral":
        cfg["sliding_window"] = args.sliding_window
    else:
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
    return cfg
