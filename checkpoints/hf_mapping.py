"""Hugging Face Llama/Mistral/Mixtral <-> hibari: config translation and tensor-name mapping.

No tensor is transformed, only renamed: hibari's model uses the same rotate-half RoPE layout and separate
projections as transformers, which is what makes the HF -> hibari -> HF round trip bit-exact. The one exception is
Mixtral's experts: the Hub stores one tensor per expert (`block_sparse_moe.experts.<e>.w1.weight`), hibari stacks
them per block (`feed_forward.experts.w1`, expert index = dim 0); stacking and unstacking copy bits unchanged.
"""

from __future__ import annotations

import re

from hibari.errors import HibariError
from megatron_ext.models.llama import ModelArgs, RopeScaling

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "MixtralForCausalLM": "mixtral"}
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
# Mixtral blocks: the same attention/norm names, the router, and stacked experts (below)
_BLOCK_MAP["feed_forward.router.weight"] = "block_sparse_moe.gate.weight"
_HF_BLOCK_MAP = {v: k for k, v in _BLOCK_MAP.items()}
_HF_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(w[123])$")
_GLOBAL_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_HF_GLOBAL_MAP = {v: k for k, v in _GLOBAL_MAP.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_to_hibari_slot(name: str) -> tuple[str, int | None] | None:
    """HF tensor name -> (hibari name, expert index or None); None for tensors hibari does not keep (rotary
    caches). An expert index says which slice of dim 0 of the stacked hibari tensor the HF tensor is."""
    if name in _HF_GLOBAL_MAP:
        return _HF_GLOBAL_MAP[name], None
    m = _HF_BLOCK_RE.match(name)
    if m and m.group(2) in _HF_BLOCK_MAP:
        return f"layers.{m.group(1)}.{_HF_BLOCK_MAP[m.group(2)]}", None
    e = _HF_EXPERT_RE.match(m.group(2)) if m else None
    if e:
        return f"layers.{m.group(1)}.feed_forward.experts.{e.group(2)}", int(e.group(1))
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise HibariError(f"unexpected tensor {name!r} in the HF checkpoint (not part of a Llama/Mistral/Mixtral model)")


def hibari_to_hf_names(name: str, n_experts: int | None = None) -> list[str]:
    """hibari tensor name -> its HF tensor names: one, or one per expert (dim 0) for stacked experts."""
    m = _BLOCK_RE.match(name)
    e = _EXPERT_RE.match(m.group(2)) if m else None
    if e is None:
        return [hibari_to_hf_name(name)]
    if n_experts is None:
        raise HibariError(f"tensor {name!r}: stacked experts need the model's n_experts")
    return [f"model.layers.{m.group(1)}.block_sparse_moe.experts.{i}.{e.group(1)}.weight" for i in range(n_experts)]


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
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
        h, e = args.ffn_hidden_dim, args.n_experts
        if args.arch == "mixtral":
            shapes.update({p + "feed_forward.router.weight": (e, d), p + "feed_forward.experts.w1": (e, h, d),
                           p + "feed_forward.experts.w3": (e, h, d), p + "feed_forward.experts.w2": (e, d, h)})
        else:
            shapes.update({p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w3.weight": (h, d),
                           p + "feed_forward.w2.weight": (d, h)})
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
        if not archs and mt in ("llama", "mistral", "mixtral"):
            arch = mt
        else:
            raise HibariError(f"{source}: architectures {archs or mt!r} not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise HibariError(f"{source}: {key}=true is not supported (Llama/Mistral use bias-free projections)")
    if cfg.get("router_jitter_noise"):
        raise HibariError(f"{source}: router_jitter_noise={cfg['router_jitter_noise']} is not supported (expected 0)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HibariError(f"{source}: hidden_act {act!r} not supported (expected 'silu')")
    try:
        theta, scaling = _rope_from_hf(cfg, source)
        n_heads = cfg["num_attention_heads"]
        moe = {}
        if arch == "mixtral":
            moe = dict(n_experts=cfg["num_local_experts"], n_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                       router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02))
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
            sliding_window=cfg.get("sliding_window") if arch in ("mistral", "mixtral") else None,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=cfg.get("initializer_range", 0.02),
            **moe,
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
    if args.arch in ("mistral", "mixtral"):
        cfg["sliding_window"] = args.sliding_window
    if args.arch == "mixtral":
        cfg.update({"num_local_experts": args.n_experts, "num_experts_per_tok": args.n_experts_per_tok,
                    "router_aux_loss_coef": args.router_aux_loss_coef, "output_router_logits": False})
        cfg.setdefault("router_jitter_noise", 0.0)
    elif args.arch == "llama":
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
    return cfg
