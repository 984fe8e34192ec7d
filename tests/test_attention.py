"""Attention kernels of the decoder (megatron_ext/models/attention.py) against a textbook oracle.

The oracle below is the attention formula written out (explicit K/V head repetition, explicit mask from the
definition of causal / sliding-window / same-document visibility, softmax) and shares no code with the model.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.models import attention as attn
from megatron_ext.models.attention import AttentionMask, attention, make_attention_mask
from megatron_ext.models.llama import Attention, ModelArgs, Transformer

B, H, H_KV, S, D = 2, 4, 2, 24, 16
# eager FlexAttention on CPU is the unfused reference implementation: that is what these parity tests want
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def oracle(q, k, v, window=None, docs=None):
    rep = q.shape[1] // k.shape[1]
    k = torch.cat([k[:, j:j + 1].expand(-1, rep, -1, -1) for j in range(k.shape[1])], dim=1)
    v = torch.cat([v[:, j:j + 1].expand(-1, rep, -1, -1) for j in range(v.shape[1])], dim=1)
    seq = q.shape[2]
    visible = torch.zeros(q.shape[0], 1, seq, seq, dtype=torch.bool)
    for b in range(q.shape[0]):
        for i in range(seq):
            for j in range(seq):
                ok = j <= i and (window is None or i - j < window) and (docs is None or docs[b, i] == docs[b, j])
                visible[b, 0, i, j] = ok
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g, requires_grad=True) for h in (H, H_KV, H_KV)]


def _docs():
    return torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 13 + [1] * 11])


CASES = [(None, None), (7, None), (None, "docs"), (5, "docs"), (S, "docs"), (S + 3, None)]


@pytest.mark.parametrize("kernel", ["dense", "flex"])
@pytest.mark.parametrize("window, docs", CASES)
def test_masked_attention_matches_the_oracle(kernel, window, docs, monkeypatch):
    if kernel == "flex":
        monkeypatch.setattr(attn, "FLEX_DEVICE_TYPES", {"cuda", "cpu"})
    doc_ids = _docs() if docs else None
    mask = make_attention_mask(S, torch.device("cpu"), window, doc_ids)
    if window is None or window >= S:
        expected_kind = "causal" if doc_ids is None else kernel
    else:
        expected_kind = kernel
    assert mask.kind == expected_kind
    q, k, v = _qkv()
    qr, kr, vr = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = oracle(qr, kr, vr, window, doc_ids)
    if mask.kind == "flex":  # torch has no FlexAttention backward on CPU: forward parity here, backward on GPU
        with torch.no_grad():
            torch.testing.assert_close(attention(q.detach(), k.detach(), v.detach(), mask), ref.detach(),
                                       atol=2e-6, rtol=1e-5)
        return
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_model_logits_are_the_same_on_flex_and_dense_masks(monkeypatch):
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                     sliding_window=6)
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, 64, (2, S))
    with torch.no_grad():
        dense = model(tokens, document_ids=_docs())
        no_docs = model(tokens)
        monkeypatch.setattr(attn, "FLEX_DEVICE_TYPES", {"cuda", "cpu"})
        flex = model(tokens, document_ids=_docs())
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-5)
    assert (dense - no_docs).abs().max() > 1e-3  # the document mask really changes the logits


class OpRecorder(TorchDispatchMode):
    """Every aten op run below autograd, with the shapes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


@pytest.mark.parametrize("window", [None, 64, 4096])
def test_causal_attention_materialises_no_seq_by_seq_tensor(window):
    """Plain causal and a window >= the sequence: forward + backward never produce an [S, S] tensor, and GQA never
    repeats K/V heads (no repeat_interleave). No model dimension equals S, so an [S, S] shape is attention's."""
    seq = 40
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                     sliding_window=window)
    model = Transformer(args)
    tokens = torch.randint(0, 64, (2, seq))
    with OpRecorder() as rec:
        model(tokens).float().mean().backward()
    square = [(op, shapes) for op, shapes in rec.ops for s in shapes if len(s) >= 2 and s[-2:] == (seq, seq)]
    assert square == []
    assert not [op for op, _ in rec.ops if "repeat_interleave" in op]
    assert any("scaled_dot_product" in op for op, _ in rec.ops)  # the recorder saw the attention kernel


def test_dense_reference_still_materialises_the_mask():
    """Guards the recorder test against a blind spot: a masked window < S is visible as an [S, S] tensor."""
    seq = 40
    model = Transformer(ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                                  sliding_window=8))
    with OpRecorder() as rec, torch.no_grad():
        model(torch.randint(0, 64, (1, seq)))
    assert any(s[-2:] == (seq, seq) for _, shapes in rec.ops for s in shapes if len(s) >= 2)


@pytest.fixture
def flash_stub(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, causal, window_size):
        calls.append({"dtypes": (q.dtype, k.dtype, v.dtype), "causal": causal, "window": window_size,
                      "heads": (q.shape[2], k.shape[2])})
        window = None if window_size[0] < 0 else window_size[0] + 1
        out = oracle(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), window)
        return out.to(q.dtype).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


def test_flash_backend_gets_one_half_dtype_under_autocast(flash_stub):
    """Under autocast without FSDP, q/k leave RoPE in fp32 (fp32 cos/sin) while v is bf16: flash-attn must see one
    dtype (the autocast dtype), with K/V heads not repeated and the window passed natively."""
    args = ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96)
    layer = Attention(args)
    x = torch.randn(2, S, 64)
    pos = torch.arange(S)[None].expand(2, S)
    from megatron_ext.models.llama import rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(rope_inv_freq(args), pos, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, cos, sin, AttentionMask("flash", sliding_window=7))
    assert flash_stub == [{"dtypes": (torch.bfloat16,) * 3, "causal": True, "window": (6, 0), "heads": (4, 2)}]
    assert out.shape == (2, S, 64)


def test_flash_is_chosen_only_where_it_can_run():
    cuda = torch.device("cuda")  # only the device type is consulted: no GPU needed
    assert make_attention_mask(S, cuda, 4096, None, flash_backend=True, dtype=torch.bfloat16).kind == "flash"
    assert make_attention_mask(S, cuda, 7, None, flash_backend=True, dtype=torch.bfloat16).sliding_window == 7
    # fp32 activations: flash-attn has no fp32 kernel, SDPA's causal path runs instead
    assert make_attention_mask(S, cuda, None, None, flash_backend=True, dtype=torch.float32).kind == "causal"
    assert make_attention_mask(S, torch.device("cpu"), None, None, flash_backend=True,
                               dtype=torch.bfloat16).kind == "causal"
