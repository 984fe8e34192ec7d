"""fp8_delayed under activation checkpointing: the forward recomputed in backward must quantize with the scales the
original forward used and must not record its amaxes again. Oracle: the same model without activation checkpointing
(nothing is recomputed there), over several steps with two micro-batches each: losses, gradients and the amax
history / use counts are identical."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron_ext.models import ModelArgs, Transformer
from megatron_ext.precision import PrecisionConfig, apply_precision, set_step_context
from megatron_ext.precision.linear import QuantizedLinear
from parallel.parallelize import apply_activation_checkpointing

ARGS = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_hidden_dim=64, max_seq_len=16)


def _run(model, steps=3, micro=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for step in range(steps):
        for m in range(micro):
            set_step_context(model, step=step, micro_batch=m)
            tokens = torch.randint(0, ARGS["vocab_size"], (2, 17), generator=g)
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            (loss / micro).backward()
            losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _states(model):
    return {n: (m.amax_history.clone(), m.amax_count.clone()) for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)}


def test_fp8_delayed_recompute_replays_forward_scales():
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**ARGS))
    cfg = PrecisionConfig(recipe="fp8_delayed", bf16_first_layers=0, bf16_last_layers=0, amax_history_len=4)
    plain, checkpointed = copy.deepcopy(base), copy.deepcopy(base)
    apply_precision(plain, cfg)
    apply_precision(checkpointed, cfg)
    apply_activation_checkpointing(checkpointed.layers, "full", 1)

    want_losses, want_grads = _run(plain)
    got_losses, got_grads = _run(checkpointed)
    assert torch.equal(torch.stack(got_losses), torch.stack(want_losses))
    for got, want in zip(got_grads, want_grads):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    want_state = _states(plain)
    got_state = {n.replace("_checkpoint_wrapped_module.", ""): v for n, v in _states(checkpointed).items()}
    assert got_state.keys() == want_state.keys() and len(want_state) == 14
    for name, (hist, count) in want_state.items():
        assert torch.equal(got_state[name][1], count), name  # each amax recorded once per forward
        assert torch.equal(got_state[name][0], hist), name
    assert int(want_state["layers.0.attention.wq"][1][0]) == 6  # x_fwd: 3 steps x 2 micro-batches
