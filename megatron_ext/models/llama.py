"""Llama 2 / Llama 3.x / Mistral decoder in plain PyTorch.

The model knows nothing of parallelism: tensor, pipeline and data parallelism are applied from outside by
`parallel/` (TorchTitan style). Choices made so that works cleanly:
- separate q/k/v/o and gate/up/down projections (column/row-wise TP plans map one-to-one onto them);
- head counts are inferred from the projection outputs in `forward` (`view(..., -1, head_dim)`), so a TP shard with
  n_heads / tp local heads runs the same code;
- transformer blocks live in an `nn.ModuleDict` keyed "0", "1", ...; pipeline stages delete blocks and set
  `tok_embeddings` / `norm` / `output` to None, and `forward` skips what is missing.

Numerics follow Hugging Face `transformers` (rotate-half RoPE, RMSNorm in fp32, llama3 RoPE scaling) so converted
checkpoints give the same logits without permuting any weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_serializer, model_validator
from torch import nn

from hibari.config import StrictModel
from megatron_ext.models.attention import AttentionMask, attention, make_attention_mask


class RopeScaling(StrictModel):
    """Llama 3.1-style frequency-dependent RoPE scaling."""

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# sparse-MoE fields (arch: mixtral, megatron_ext/models/mixtral.py); left out of dense models' hibari_model.json
MOE_FIELDS = ("n_experts", "n_experts_per_tok", "router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor")


class ModelArgs(StrictModel):
    """Architecture of a Llama/Mistral/Mixtral decoder. Stored as `hibari_model.json` next to every checkpoint."""

    arch: Literal["llama", "mistral", "mixtral"] = "llama"
    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    ffn_hidden_dim: int = Field(gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = Field(default=4096, gt=0)
    sliding_window: int | None = Field(default=None, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(default=0.02, gt=0)
    attn_backend: Literal["sdpa", "flash"] = "sdpa"
    # mixtral only: the feed-forward of every block is a sparse mixture of SwiGLU experts of ffn_hidden_dim
    n_experts: int | None = Field(default=None, gt=0, description="mixtral: experts per block")
    n_experts_per_tok: int = Field(default=2, gt=0, description="mixtral: experts each token is routed to (top-k)")
    router_aux_loss_coef: float = Field(default=0.02, ge=0.0, description="mixtral: load-balancing loss weight")
    router_z_loss_coef: float = Field(default=0.0, ge=0.0, description="mixtral: router z-loss weight (0: off)")
    moe_capacity_factor: float | None = Field(default=None, gt=0.0, description="mixtral: expert capacity = "
                                              "factor x tokens x top_k / n_experts (None: dropless)")

    @model_serializer(mode="wrap")
    def _dense_without_moe_fields(self, handler):
        data = handler(self)
        if self.arch != "mixtral" and isinstance(data, dict):
            for key in MOE_FIELDS:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelArgs":
        if self.arch == "mixtral":
            if self.n_experts is None:
                raise ValueError("arch mixtral needs n_experts")
            if self.n_experts_per_tok > self.n_experts:
                raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) exceeds n_experts ({self.n_experts})")
        elif self.n_experts is not None:
            raise ValueError(f"n_experts is set but arch is {self.arch!r} (experts need arch: mixtral)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "or head_dim must be given")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    def num_params(self, include_embeddings: bool = True, active_only: bool = False) -> int:
        """Parameter count; `active_only`: a MoE block counts the top-k experts a token uses, not all of them."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (2 * self.n_heads + 2 * kv)
        ffn = 3 * self.dim * self.ffn_hidden_dim
        if self.n_experts is not None:
            ffn = ffn * (self.n_experts_per_tok if active_only else self.n_experts) + self.dim * self.n_experts
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.dim + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention scores (PaLM appendix B)."""
        n = self.num_params(include_embeddings=False, active_only=True) + self.vocab_size * self.dim  # head: a GEMM
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * n + attn


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies (fp32), with llama3 scaling when configured (same float ops as transformers)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    rs = args.rope_scaling
    if rs is None:
        return inv_freq
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the activation dtype (bf16 variance is too coarse)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask):
        bsz, seq_len, _ = x.shape
        q = self.wq(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = self.build_feed_forward(args)

    def build_feed_forward(self, args: ModelArgs) -> nn.Module:
        """The block's MLP (a subclass swaps in a mixture of experts: megatron_ext/models/mixtral.py)."""
        return FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    block_class = TransformerBlock

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): self.block_class(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # recomputed, never checkpointed: the table depends only on the config
        self.register_buffer("rope_inv_freq", rope_inv_freq(args), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (also after building on the meta device and `to_empty`)."""
        std = self.args.init_std
        # residual-branch outputs scaled by depth so the residual stream does not grow with n_layers
        out_std = std / math.sqrt(2 * self.args.n_layers)
        self.rope_inv_freq.copy_(rope_inv_freq(self.args).to(self.rope_inv_freq.device))
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            ffn = block.feed_forward
            dense = isinstance(ffn, FeedForward)  # (same RNG order as before MoE blocks existed)
            attn = block.attention
            for lin in (attn.wq, attn.wk, attn.wv) + ((ffn.w1, ffn.w3) if dense else ()):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            if dense:
                nn.init.normal_(ffn.w2.weight, std=out_std)
            else:
                ffn.init_weights(std, out_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] (or hidden states [batch, seq, dim] on a later pipeline stage) -> logits/hidden."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        bsz, seq_len = h.shape[0], h.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=h.device).unsqueeze(0).expand(bsz, seq_len)
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, h.dtype)
        mask = make_attention_mask(seq_len, h.device, self.args.sliding_window, document_ids,
                                   flash_backend=self.args.attn_backend == "flash", dtype=h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
