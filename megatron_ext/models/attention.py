"""Causal attention for the decoder: which kernel runs, and the mask it needs (if any).

One `AttentionMask` is built per model forward and shared by every block:
- plain causal, or a sliding window at least as long as the sequence: no mask at all; SDPA with `is_causal=True`
  (flash / memory-efficient kernels on GPU, the fused flash kernel on CPU), no [S, S] tensor anywhere;
- sliding window shorter than the sequence, or document masking (packed samples): a FlexAttention block mask on
  CUDA (compiled `flex_attention`, only non-empty 128x128 tiles computed; the block mask is evaluated once per
  forward, not per layer); the dense boolean mask on CPU, where eager FlexAttention is an unfused reference that
  materialises the scores anyway and has no backward (the parity tests still run it, forward only);
- `attn_backend: flash` on CUDA without document masking: flash-attn's kernel (native causal window and GQA).
Grouped-query attention never repeats K/V heads: SDPA and FlexAttention get `enable_gqa=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# device types whose masked attention runs on FlexAttention block masks (tests add "cpu" to check parity)
FLEX_DEVICE_TYPES = {"cuda"}
_compiled_flex = None


@dataclass
class AttentionMask:
    """What the attention of one forward must respect, in the form its kernel needs.

    kind: "causal" (no mask), "flex" (`block_mask`), "dense" (`dense`, [batch|1, 1, S, S] bool, True = may attend),
    or "flash" (flash-attn's own causal window).
    """

    kind: str
    sliding_window: int | None = None  # only when shorter than the sequence
    document_ids: torch.Tensor | None = None
    block_mask: object | None = None
    dense: torch.Tensor | None = None


def build_attention_mask(seq_len: int, device: torch.device, sliding_window: int | None = None,
                         document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Dense reference: boolean mask [batch|1, 1, seq, seq] (True = may attend), or None for plain causal.

    Sliding window as in Mistral/transformers: query i sees keys j with i - window < j <= i. Document masking:
    a query sees only keys of its own document (ids from the data loader), so packed samples do not leak.
    """
    if (sliding_window is None or sliding_window >= seq_len) and document_ids is None:
        return None
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    mask = k <= q
    if sliding_window is not None and sliding_window < seq_len:
        mask = mask & (k > q - sliding_window)
    mask = mask[None, None]
    if document_ids is not None:
        same_doc = document_ids[:, None, :, None] == document_ids[:, None, None, :]
        mask = mask & same_doc
    return mask


def _mask_mod(sliding_window: int | None, document_ids: torch.Tensor | None):
    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if sliding_window is not None:
            keep = keep & (q_idx - kv_idx < sliding_window)
        if document_ids is not None:
            keep = keep & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return keep

    return mask_mod


def make_attention_mask(seq_len: int, device: torch.device, sliding_window: int | None,
                        document_ids: torch.Tensor | None, flash_backend: bool = False,
                        dtype: torch.dtype = torch.float32) -> AttentionMask:
    """The mask for one forward over `seq_len` positions (see the module docstring for the kernel choice).

    dtype: the activations' dtype; flash-attn needs fp16/bf16 (its own or autocast's), fp32 runs SDPA/Flex.
    """
    window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
    if document_ids is not None:
        document_ids = document_ids.to(device)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if flash_backend and device.type == "cuda" and document_ids is None and dtype in (torch.float16, torch.bfloat16):
        return AttentionMask("flash", sliding_window=window)
    if window is None and document_ids is None:
        return AttentionMask("causal")
    if device.type in FLEX_DEVICE_TYPES:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

        batch = None if document_ids is None else document_ids.shape[0]
        block_mask = create_block_mask(_mask_mod(window, document_ids), batch, None, seq_len, seq_len,
                                       device=device)
        return AttentionMask("flex", window, document_ids, block_mask=block_mask)
    return AttentionMask("dense", window, document_ids,
                         dense=build_attention_mask(seq_len, device, window, document_ids))


def _common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast, q/k come out of RoPE in fp32 (the cos/sin tables are fp32) while v is already in the
    autocast dtype; kernels that autocast does not cover need one dtype: the autocast dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q [b, h, s, d], k/v [b, h_kv, s, d] (h a multiple of h_kv) -> [b, h, s, d]."""
    if mask.kind == "flash":
        return flash_attention(*_common_dtype(q, k, v), mask.sliding_window)
    if mask.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if mask.kind == "flex":
        return flex_attention(q, k, v, mask.block_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)


def flex_attention(q, k, v, block_mask):
    """FlexAttention; compiled on CUDA (the fused kernel), eager elsewhere (an unfused reference)."""
    from torch.nn.attention.flex_attention import flex_attention as flex  # noqa: PLC0415

    q, k, v = _common_dtype(q, k, v)
    if q.is_cuda:
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def flash_attention(q, k, v, sliding_window: int | None):
    """flash-attn (GPU only, imported lazily); q/k/v in one half dtype, GQA and the causal window native."""
    from flash_attn import flash_attn_func  # noqa: PLC0415

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=window)
    return out.transpose(1, 2)
