"""Fused NVFP4 linears (`megatron_ext/precision/fusion.py`): the linears of a block that read the same input run as
one autograd Function. Oracles: the recipe's own per-linear path (`NVFP4Recipe` through `_QuantizedMatmul`, itself
checked against the scalar reference quantizer in test_nvfp4_quantizer / test_precision_linear) and the same model
with the linears left separate. Forward outputs and weight gradients must be bit-identical, dx equal to fp32
summation order; SR on and off; unused outputs, other inputs and in-place weight updates; TP2 and FSDP2 (2 gloo
processes).
"""

import copy
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_ext.models import ModelArgs, Transformer
from megatron_ext.models.llama import FeedForward
from megatron_ext.models.llama_parallel import LINEAR_GROUPS, LlamaPlan
from megatron_ext.precision import PrecisionConfig, QuantizedLinear, apply_precision, fusion, set_step_context
from megatron_ext.precision.linear import RECIPES, quantized_linear
from megatron_ext.precision.recipes import ShardContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GQA = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, max_seq_len=64)


def _cfg(sr=True, rht=True):
    return PrecisionConfig(recipe="nvfp4", bf16_first_layers=0, bf16_last_layers=0, stochastic_rounding=sr, rht=rht)


class _FusedCalls:
    """Counts the fused Function's forwards (one per group computed)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = fusion.fused_forward

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(fusion, "fused_forward", counted)


@pytest.mark.parametrize("sr,rht", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("tokens", [64, 40])  # 40: the wgrad operands are zero-padded to 48
def test_single_linear_is_bitwise_the_recipe_path(sr, rht, tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=g) * 0.1
    dy = torch.randn(tokens, 48, generator=g)
    got = []
    for fused in (True, False):
        rec = RECIPES["nvfp4"](_cfg(sr, rht), 7)
        rec.fused = fused  # False: NVFP4Recipe.forward / backward (the oracle)
        rec.rounding.set(3, 1, 0)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = quantized_linear(xr, wr, rec)
        y.backward(dy)
        got.append((y.detach(), xr.grad, wr.grad))
    for a, b in zip(*got):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _llama_step(model, tokens, steps=2, checkpoint=False):
    for step in range(steps):
        set_step_context(model, step=step, micro_batch=0, dp_rank=0)
        model.zero_grad(set_to_none=True)
        if checkpoint:
            for block in model.layers.values():
                block.forward = _checkpointed(block.forward)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if checkpoint:
            for block in model.layers.values():
                del block.forward
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1e-2 * p.grad)  # in place, as the optimizer: held outputs must not survive it
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _checkpointed(fn):
    from torch.utils.checkpoint import checkpoint

    return lambda *a: checkpoint(fn, *a, use_reentrant=False)


def _models(sr, rht=True):
    torch.manual_seed(0)
    base = Transformer(GQA)
    fused, separate = copy.deepcopy(base), copy.deepcopy(base)
    LlamaPlan(GQA, _cfg(sr, rht)).apply_precision(fused)  # the trainer's path (build_stage)
    apply_precision(separate, _cfg(sr, rht))
    return fused, separate


def _assert_grads(got, want, linear_bitwise=True):
    for name, g in want.items():
        if linear_bitwise and any(name.endswith(f"{w}.weight") for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
            assert torch.equal(got[name], g), name
        else:  # reached through dx: the members' dgrad products are summed in one GEMM
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("sr,rht", [(False, True), (True, True), (True, False)])
def test_grouped_llama_matches_separate_linears(sr, rht, monkeypatch):
    fused, separate = _models(sr, rht)
    blk = fused.layers["0"]
    assert blk.attention.wq._fusion_group is blk.attention.wv._fusion_group  # wq/wk/wv: 64/32/32 outputs (GQA)
    assert blk.feed_forward.w1._fusion_group.members == [blk.feed_forward.w1, blk.feed_forward.w3]
    tokens = torch.randint(0, 128, (2, 41), generator=torch.Generator().manual_seed(1))
    calls = _FusedCalls(monkeypatch)
    y_f, g_f = _llama_step(fused, tokens)
    assert calls.n == 2 * 2 * 4  # steps x blocks x (qkv, wo, w1/w3, w2): every later member took its output
    y_s, g_s = _llama_step(separate, tokens)
    assert torch.equal(y_f, y_s)
    _assert_grads(g_f, g_s)


def test_grouped_llama_under_activation_checkpointing():
    fused, separate = _models(sr=True)
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    y_f, g_f = _llama_step(fused, tokens, steps=1, checkpoint=True)
    y_s, g_s = _llama_step(separate, tokens, steps=1)
    assert torch.equal(y_f, y_s)
    _assert_grads(g_f, g_s)


def _ffn_pair(sr=True):
    torch.manual_seed(0)
    ff = FeedForward(64, 128)
    for name in ("w1", "w2", "w3"):
        setattr(ff, name, QuantizedLinear.from_linear(getattr(ff, name), RECIPES["nvfp4"](_cfg(sr), int(name[1]))))
    grouped = copy.deepcopy(ff)
    assert fusion.fuse_linear_groups(grouped, [""], [("w1", "w3")]) == 1
    assert grouped.w1._fusion_group.members[1] is grouped.w3
    copied = copy.deepcopy(grouped)  # a deep copy regroups the copies, never the originals
    assert copied.w1._fusion_group.members == [copied.w1, copied.w3]
    return grouped, ff


def test_unused_output_gets_no_gradient_and_other_inputs_run_alone(monkeypatch):
    grouped, ff = _ffn_pair()
    x = torch.randn(2, 24, 64)
    calls = _FusedCalls(monkeypatch)
    for model in (grouped, ff):
        set_step_context(model, step=1)
        xr = x.clone().requires_grad_(True)
        model.w1(xr).square().sum().backward()  # w3's output (held by the group) is never used
    assert calls.n == 2 and grouped.w3.weight.grad is None and ff.w3.weight.grad is None
    assert torch.equal(grouped.w1.weight.grad, ff.w1.weight.grad)
    # w3 called on another tensor (equal values): runs alone; after an in-place update of w3: recomputed
    outs = []
    for model in (grouped, ff):
        a = model.w1(x)
        b = model.w3(x.clone())
        with torch.no_grad():
            model.w3.weight.mul_(0.5)
        c = model.w1(x)
        with torch.no_grad():
            model.w3.weight.mul_(0.5)
        d = model.w3(x)
        outs.append((a, b, c, d))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_grouped_step_has_no_host_sync_and_at_most_3x_fp32_ops():
    from bench.precision_ops import Run, count_step

    counts = {r: count_step(Run(r, 2, 32)) for r in ("fp32", "nvfp4")}
    run_ops = {r: sum(c.total for c in pair) for r, pair in counts.items()}
    assert counts["nvfp4"][0].syncs == 0
    assert run_ops["nvfp4"] <= 3 * run_ops["fp32"], run_ops


def test_trainer_plan_groups_every_quantized_block():
    plan = LlamaPlan(GQA, PrecisionConfig(recipe="nvfp4", bf16_first_layers=1, bf16_last_layers=0))
    stage = plan.build_stage([0, 1], first=True, last=True)
    assert "_fusion_group" not in stage.layers["0"].attention.wq.__dict__  # kept in bf16: not quantized
    blk = stage.layers["1"]
    assert [m for m in blk.attention.wq._fusion_group.members] == [blk.attention.wq, blk.attention.wk,
                                                                   blk.attention.wv]
    assert LINEAR_GROUPS[1] == ("feed_forward.w1", "feed_forward.w3")
    plan_fp8 = LlamaPlan(GQA, PrecisionConfig(recipe="fp8_tensorwise", bf16_first_layers=0, bf16_last_layers=0))
    assert "_fusion_group" not in plan_fp8.build_stage([0], True, True).layers["0"].attention.wq.__dict__


# --- tensor parallel: column-parallel members share the (all-gathered) input -----------------------------------

def _tp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    failures = []
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       parallelize_module)

        mesh = init_device_mesh("cpu", (2,))
        for sp in (False, True):
            ref, _ = _ffn_pair(sr=True)
            tp = copy.deepcopy(ref)
            for model in (ref, tp):
                for name in ("w1", "w2", "w3"):
                    getattr(model, name).recipe.capture = {}
            plan = {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                    "w2": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())}
            parallelize_module(tp, mesh, plan)
            if sp:  # as the Llama plan: the MLP input all-gathered once, shared by w1 and w3
                parallelize_module(tp, mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                                desired_input_layouts=(Replicate(),)))
            for model in (ref, tp):
                set_step_context(model, step=7, micro_batch=1, dp_rank=0)
            g = torch.Generator().manual_seed(1)
            x, dy = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, 64, generator=g)
            seq = slice(rank * 16, (rank + 1) * 16) if sp else slice(None)
            x_ref = x.clone().requires_grad_(True)
            ref(x_ref).backward(dy)
            x_tp = x[:, seq].clone().requires_grad_(True)
            real, calls = fusion.fused_forward, []
            fusion.fused_forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
            try:
                y_tp = tp(x_tp)
            finally:
                fusion.fused_forward = real
            if len(calls) != 2:  # w1 + w3 as one group, w2
                failures.append(f"rank {rank} sp={sp}: {len(calls)} fused calls, expected 2")
            y_tp = y_tp.to_local() if hasattr(y_tp, "to_local") else y_tp
            y_tp.backward(dy[:, seq])
            half = slice(rank * 64, (rank + 1) * 64)
            for layer in ("w1", "w3"):
                for role, index in (("x_fwd", ...), ("w_fwd", half), ("dy_dgrad", (slice(None), half)),
                                    ("dy_wgrad", half), ("x_wgrad", ...)):
                    got = getattr(tp, layer).recipe.capture.get(role)
                    want = getattr(ref, layer).recipe.capture[role][index]
                    if got is None or not torch.equal(got, want):
                        failures.append(f"rank {rank} sp={sp}: {layer}.{role} differs from TP1")
                full = getattr(ref, layer).weight.grad[half]
                if not torch.allclose(getattr(tp, layer).weight.grad.to_local(), full, rtol=1e-5, atol=1e-6):
                    failures.append(f"rank {rank} sp={sp}: {layer} weight grad differs")
            if not torch.allclose(x_tp.grad, x_ref.grad[:, seq], rtol=1e-5, atol=1e-6):
                failures.append(f"rank {rank} sp={sp}: dx differs")
        _check_fsdp2_group(rank, mesh, failures)
    except Exception:
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_fsdp2_group(rank, mesh, failures):
    """FSDP2 with the whole MLP as one unit (as a block): the group's weights are gathered together, so it fuses;
    forward bit-identical to the unsharded grouped MLP, gradients the data-parallel average."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    ref, _ = _ffn_pair(sr=False)
    sharded = copy.deepcopy(ref)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(10 + rank))
    real, calls = fusion.fused_forward, []
    fusion.fused_forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = sharded(x)
    finally:
        fusion.fused_forward = real
    y_ref = ref(x)
    if len(calls) != 2 or not torch.equal(y, y_ref):
        failures.append(f"rank {rank} fsdp2: {len(calls)} fused calls; forward equal: {torch.equal(y, y_ref)}")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for name in ("w1", "w2", "w3"):
        want = getattr(ref, name).weight.grad.clone()
        dist.all_reduce(want)
        if not torch.allclose(getattr(sharded, name).weight.grad.full_tensor(), want / 2, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {rank} fsdp2: {name} grad differs")


@pytest.mark.slow
def test_tp2_grouped_members_quantize_like_unsharded(tmp_path):
    from test_precision_tp import _free_port

    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert all(r == "" for r in reports), "\n".join(reports)


@pytest.mark.parametrize("sr", [False, True])
def test_frozen_input_and_no_grad_are_bitwise_the_recipe_path(sr):
    """x without grad (no dgrad: the backward quantizes only the wgrad operands) and inference under no_grad."""
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(40, 64, generator=g), torch.randn(48, 64, generator=g) * 0.1, torch.randn(40, 48, generator=g)
    got = []
    for fused in (True, False):
        rec = RECIPES["nvfp4"](_cfg(sr), 5)
        rec.fused = fused
        wr = w.clone().requires_grad_(True)
        y = quantized_linear(x, wr, rec)
        y.backward(dy)
        with torch.no_grad():
            got.append((y.detach(), wr.grad, quantized_linear(x, wr, rec)))
    for a, b in zip(*got):
        assert torch.equal(a, b)
