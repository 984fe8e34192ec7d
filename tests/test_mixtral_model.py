"""Mixtral model numerics against independent oracles: transformers' MixtralForCausalLM (eager experts loop) and
`load_balancing_loss_func`, per-expert matmuls, a Python reference for capacity dropping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixtral_fixtures import MIXTRAL_VARIANTS, make_hf_mixtral, save_hf_mixtral  # noqa: E402

from checkpoints.convert import hf_to_hibari  # noqa: E402
from checkpoints.hf_mapping import hibari_to_hf_names  # noqa: E402
from checkpoints import load_hibari  # noqa: E402
from megatron_ext.models import ModelArgs, build_model  # noqa: E402
from megatron_ext.models.mixtral import (GroupedExperts, MixtralTransformer, grouped_linear, route,  # noqa: E402
                                         router_losses, sort_by_expert)


def _pair(variant, tmp_path):
    save_hf_mixtral(tmp_path / "hf", variant)
    hf_to_hibari(tmp_path / "hf", tmp_path / "ckpt")
    return load_hibari(tmp_path / "ckpt", dtype=torch.float32), make_hf_mixtral(variant)


@pytest.mark.parametrize("variant", sorted(MIXTRAL_VARIANTS))
def test_logits_and_aux_loss_match_transformers(variant, tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ours, theirs = _pair(variant, tmp_path)
    assert isinstance(ours, MixtralTransformer)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # longer than the window (8)
    with torch.no_grad():
        ref = theirs(ids, output_router_logits=True)
        got = ours(ids)
    diff = (got - ref.logits).abs().max().item()
    assert diff <= 1e-5, f"{variant}: max abs logits diff {diff}"
    cfg = theirs.config
    want = load_balancing_loss_func(ref.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
    losses = ours.router_losses()
    assert abs(losses.load_balancing.item() - want.item()) <= 1e-6
    assert losses.expert_load.shape == (cfg.num_hidden_layers, cfg.num_local_experts)
    assert losses.expert_load.sum().item() == cfg.num_hidden_layers * ids.numel() * cfg.num_experts_per_tok
    # z-loss: sum over blocks of mean(logsumexp(logits)^2), on transformers' router logits
    z_want = sum(torch.logsumexp(r.float(), -1).square().mean() for r in ref.router_logits)
    assert abs(losses.z_loss.item() - z_want.item()) <= 1e-4 * z_want.item()


def test_training_loss_and_gradients_match_transformers(tmp_path):
    """CE + router_aux_loss_coef x aux (transformers' `loss` with labels) and every parameter's gradient."""
    ours, theirs = _pair("top2_of_4", tmp_path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = theirs(ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    logits = ours(ids)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss = ce + ours.router_losses().total
    loss.backward()
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    hf_params = dict(theirs.named_parameters())
    hf_grads = {}  # transformers v5 fuses experts (gate_up_proj / down_proj): unfuse to the Hub's per-expert names
    for name, p in hf_params.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("mlp.experts.gate_up_proj")]
            for e, g in enumerate(p.grad):
                w1, w3 = g.chunk(2, dim=0)
                hf_grads[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = w1
                hf_grads[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = w3
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("mlp.experts.down_proj")]
            for e, g in enumerate(p.grad):
                hf_grads[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"] = g
        else:
            hf_grads[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = p.grad
    checked = 0
    for name, p in ours.named_parameters():
        hf_names = hibari_to_hf_names(name, ours.args.n_experts)
        grads = p.grad if len(hf_names) == 1 else p.grad.unbind(0)
        for hf_name, g in zip(hf_names, [grads] if len(hf_names) == 1 else grads):
            torch.testing.assert_close(g, hf_grads[hf_name], rtol=1e-4, atol=1e-6, msg=hf_name)
            checked += 1
    assert checked == len(hf_grads)


def test_aux_loss_and_its_gradient_match_load_balancing_loss_func():
    """Same random router logits into both: value and gradient w.r.t. the logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(5)
    n_experts, top_k = 8, 2
    logits = [torch.randn(37, n_experts, generator=gen, requires_grad=True) for _ in range(3)]
    want = load_balancing_loss_func(tuple(logits), n_experts, top_k)
    want_grads = torch.autograd.grad(want, logits)
    args = ModelArgs(arch="mixtral", vocab_size=8, dim=8, n_layers=3, n_heads=2, ffn_hidden_dim=8,
                     n_experts=n_experts, n_experts_per_tok=top_k, router_aux_loss_coef=0.5)
    got = router_losses([route(x, top_k)[2] for x in logits], args)
    assert abs(got.load_balancing.item() - want.item()) <= 1e-6
    assert abs(got.total.item() - 0.5 * want.item()) <= 1e-6
    for g, w in zip(torch.autograd.grad(got.load_balancing, logits), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dim,hidden", [(16, 32), (10, 6)])  # aligned: grouped GEMM; unaligned: per-expert loop
def test_grouped_linear_matches_per_expert_matmul(dim, hidden):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, dim, generator=gen, requires_grad=True)
    w = torch.randn(4, hidden, dim, generator=gen, requires_grad=True)
    grad_out = torch.randn(10, hidden, generator=gen)
    out = grouped_linear(x, w, sizes)
    out.backward(grad_out)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    starts = [0, 3, 3, 8, 10]
    ref = torch.cat([x[starts[g]:starts[g + 1]] @ w[g].T for g in range(4)])
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-6)
    grouped_linear(x, w, sizes).sum().backward()  # an expanded (stride-0) gradient must not break the backward


def _reference_moe(x, weights, expert_ids, experts: GroupedExperts, capacity):
    """Token-by-token Python reference: expert e takes its first `capacity` assignments in (token, slot) order."""
    out = torch.zeros_like(x)
    taken = [0] * experts.w1.shape[0]
    for t in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = int(expert_ids[t, slot])
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue
            h = F.silu(x[t] @ experts.w1[e].T) * (x[t] @ experts.w3[e].T)
            out[t] += weights[t, slot] * (h @ experts.w2[e].T)
    return out


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_and_capacity_match_token_loop(capacity_factor):
    args = ModelArgs(arch="mixtral", vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_hidden_dim=24, n_experts=4,
                     n_experts_per_tok=2, moe_capacity_factor=capacity_factor)
    torch.manual_seed(0)
    moe = build_model(args).layers["0"].feed_forward
    with torch.no_grad():
        moe.router.weight.normal_(0, 2.0)  # skewed routing, so a capacity really drops assignments
    x = torch.randn(2, 15, 16)
    with torch.no_grad():
        got = moe(x).reshape(-1, 16)
        flat = x.reshape(-1, 16)
        weights, expert_ids, _ = route(moe.router(flat), 2)
        capacity = None if capacity_factor is None else int(-(-capacity_factor * 30 * 2 // 4))
        want = _reference_moe(flat, weights, expert_ids, moe.experts, capacity)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if capacity_factor is not None:
        order, sizes = sort_by_expert(expert_ids, 4, capacity)
        assert sizes.max().item() == capacity and order.numel() < expert_ids.numel()  # something was dropped


def test_mixtral_args_validation():
    base = dict(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_hidden_dim=24)
    with pytest.raises(ValueError, match="needs n_experts"):
        ModelArgs(arch="mixtral", **base)
    with pytest.raises(ValueError, match="exceeds n_experts"):
        ModelArgs(arch="mixtral", n_experts=2, n_experts_per_tok=3, **base)
    with pytest.raises(ValueError, match="need arch: mixtral"):
        ModelArgs(arch="llama", n_experts=4, **base)
    dense = ModelArgs(**base).model_dump()
    assert "n_experts" not in dense and "router_aux_loss_coef" not in dense  # dense hibari_model.json unchanged
    moe = ModelArgs(arch="mixtral", n_experts=4, **base)
    assert moe.model_dump()["n_experts"] == 4
    # 4 experts x 3 matrices x 16 x 24 + router; flops count the 2 active experts only
    assert moe.num_params() - ModelArgs(**base).num_params() == 3 * (3 * 16 * 24) + 16 * 4
    assert moe.num_params(active_only=True) - ModelArgs(**base).num_params() == 1 * (3 * 16 * 24) + 16 * 4


def test_grouped_linear_on_no_tokens_keeps_the_graph():
    """An expert-parallel rank that receives no tokens must still run backward through the all-to-all (else its
    peers wait in the collective forever): the empty output stays connected to its input."""
    from megatron_ext.models.mixtral import grouped_linear

    x = torch.zeros(0, 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    y = grouped_linear(x, w, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 8) and y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)
