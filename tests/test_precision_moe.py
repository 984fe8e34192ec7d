"""Quantized expert GEMMs (megatron_ext/precision/grouped.py): each expert's GEMMs against a per-expert
fake-quantized fp32 oracle, the selective rules and the precision switch on Mixtral, training through the config."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hibari.config import load_config
from hibari.errors import HibariError
from megatron_ext.models.llama import ModelArgs
from megatron_ext.models.mixtral import GroupedExperts, MixtralTransformer, grouped_linear
from megatron_ext.precision import (PrecisionConfig, PrecisionSchedule, QuantizedLinear, apply_precision,
                                    set_precision_mode, set_step_context)
from megatron_ext.precision import fp8, nvfp4
from megatron_ext.precision.apply import _layer_seed
from megatron_ext.precision.grouped import ExpertRecipes, grouped_quantized_linear
from megatron_ext.precision.hadamard import apply_rht

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [5, 0, 23, 12]  # an empty expert, groups that are not multiples of 16 (wgrad pads the token dim)
MOE = dict(arch="mixtral", vocab_size=128, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=32,
           max_seq_len=64, n_experts=4, n_experts_per_tok=2)


def _bound_check(got, a, b):
    """nvfp4_gemm.py's stated tolerance: the GEMM on exact operands vs the fp32 emulation differs elementwise by
    at most 2 (K + 3) 2^-24 (|a| @ |b|^T) (fp32 accumulation, per-tensor factors)."""
    bound = 2 * (a.shape[1] + 3) * 2.0 ** -24 * (a.double().abs() @ b.double().abs().t())
    err = (got.double() - (a @ b.t()).double()).abs()
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item()}"


def _operands(k=64, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(SIZES)
    return (torch.randn(t, k, generator=g), torch.randn(len(SIZES), n, k, generator=g) * 0.1,
            torch.randn(t, n, generator=g))


def _run_grouped(recipe, **kw):
    x, w, dy = _operands()
    cfg = PrecisionConfig(recipe=recipe, **kw)
    holder = ExpertRecipes(cfg, {"w": [100 + e for e in range(len(SIZES))]})
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = grouped_quantized_linear(xr, wr, SIZES, holder.recipes["w"], "quantized", torch.float32)
    y.backward(dy)
    return x, w, dy, holder.recipes["w"], y.detach(), xr.grad, wr.grad


def _groups(t):
    return torch.split(t, SIZES)


def test_nvfp4_expert_gemms_match_a_per_expert_fake_quantized_oracle():
    """Per expert: fprop Q(x_e) 1x16 . Q(W_e) 16x16, dgrad Q(dy_e) . the same Q(W_e), wgrad on RHT'd operands with
    the expert's own Hadamard signs; amaxes are the expert's own (its tokens only); the empty expert's dW is 0."""
    x, w, dy, recipes, y, dx, dw = _run_grouped("nvfp4", stochastic_rounding=False)
    for e, (xe, dye, ye, dxe) in enumerate(zip(_groups(x), _groups(dy), _groups(y), _groups(dx))):
        if not SIZES[e]:
            assert torch.equal(dw[e], torch.zeros_like(dw[e]))
            continue
        wq = nvfp4.fake_quantize(w[e], (16, 16))
        pad = (-SIZES[e]) % 16
        a = nvfp4.fake_quantize(apply_rht(F.pad(dye.t(), (0, pad)), recipes[e].rht))
        b = nvfp4.fake_quantize(apply_rht(F.pad(xe.t(), (0, pad)), recipes[e].rht))
        _bound_check(ye, nvfp4.fake_quantize(xe), wq)
        _bound_check(dxe, nvfp4.fake_quantize(dye), wq.t())
        _bound_check(dw[e], a, b)
    # the experts really are separate layers: the per-expert amax differs from one over all tokens
    whole = nvfp4.fake_quantize(x)[:SIZES[0]] @ nvfp4.fake_quantize(w[0], (16, 16)).t()
    assert not torch.equal(whole, y[:SIZES[0]])


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "mxfp8"])
def test_fp8_expert_gemms_match_a_per_expert_fake_quantized_oracle(recipe):
    """fp8_tensorwise: E4M3 x / W, E5M2 dy, one scale per operand of each expert; fp8_rowwise: E4M3, a power-of-two
    scale per row of each of the six operands; mxfp8: 1x32 E8M0 blocks along each GEMM's reduction dim. Oracle:
    fp8.py's quantizers per operand (RNE), fp32 matmul."""
    x, w, dy, _, y, dx, dw = _run_grouped(recipe)
    per_row = recipe != "fp8_tensorwise"  # six quantizations, each along its GEMM's reduction dim
    if recipe == "mxfp8":
        def q(t, grad=False):
            return fp8.mxfp8(t.contiguous())
    elif recipe == "fp8_rowwise":
        def q(t, grad=False):
            return fp8.rowwise(t.contiguous())
    else:
        def q(t, grad=False):
            return fp8.tensorwise(t, fp8.E5M2 if grad else fp8.E4M3)
    for e, (xe, dye, ye, dxe) in enumerate(zip(_groups(x), _groups(dy), _groups(y), _groups(dx))):
        if not SIZES[e]:
            assert torch.equal(dw[e], torch.zeros_like(dw[e]))
            continue
        want_y = q(xe) @ q(w[e]).t()
        want_dx = q(dye, True) @ (q(w[e].t()).t() if per_row else q(w[e]))
        pad = (-SIZES[e]) % (32 if recipe == "mxfp8" else 16)
        a = q(F.pad(dye.t(), (0, pad)), True) if per_row else q(dye, True).t()
        b = q(F.pad(xe.t(), (0, pad))) if per_row else q(xe).t()
        for got, want in ((ye, want_y), (dxe, want_dx), (dw[e], a @ b.t())):
            # same operands, fp32 GEMMs: only the scale application / summation order differ
            assert ((got - want).norm() / want.norm()).item() < 1e-5
        ref = xe @ w[e].t()
        assert ((ye - ref).norm() / ref.norm()).item() > 1e-4  # it really is quantized


def _model(cfg=None, seed=0):
    torch.manual_seed(seed)
    m = MixtralTransformer(ModelArgs(**MOE))
    m.init_weights()
    if cfg is not None:
        apply_precision(m, cfg)
    return m


def test_selective_rules_and_seeds_reach_the_experts():
    cfg = PrecisionConfig(recipe="nvfp4", bf16_first_layers=1, bf16_last_layers=1)
    m = _model(cfg)
    for i, block in m.layers.items():
        ff = block.feed_forward
        quantized = i in ("1", "2")
        assert (ff.experts.recipe is not None) == quantized
        assert isinstance(block.attention.wq, QuantizedLinear) == quantized
        assert type(ff.router) is torch.nn.Linear  # the router stays high precision
    holder = m.layers["2"].feed_forward.experts.recipe
    assert [r.layer_seed for r in holder.recipes["w3"]] == [
        _layer_seed(cfg, f"layers.2.feed_forward.experts.w3.{e}") for e in range(MOE["n_experts"])]
    assert set_step_context(m, step=3, micro_batch=1) >= 2 and holder.rounding.step == 3
    # the trainer's path: MixtralPlan builds its (meta) stage with the recipe applied
    from megatron_ext.models.mixtral_parallel import MixtralPlan

    stage = MixtralPlan(ModelArgs(**MOE), cfg).build_stage([0, 1, 2, 3], True, True)
    assert [b.feed_forward.experts.recipe is not None for b in stage.layers.values()] == [False, True, True, False]


def test_bf16_and_forward_only_switch_reach_the_experts():
    """bf16: the experts run the model's own grouped GEMMs (bitwise the unquantized model); forward_only: the
    experts' fprop GEMMs run on bf16-rounded operands (oracle: per expert fp32 matmul of bf16-rounded x and W)
    while their backward stays quantized."""
    cfg = PrecisionConfig(recipe="nvfp4", bf16_first_layers=1, bf16_last_layers=1, switch_at=0.5,
                          switch_mode="forward_only")
    plain, quant = _model(), _model(cfg)
    experts: GroupedExperts = quant.layers["1"].feed_forward.experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(SIZES), MOE["dim"], generator=g)
    sizes = torch.tensor(SIZES)
    ref = plain.layers["1"].feed_forward.experts(x, sizes)
    quantized = experts(x, sizes)
    assert 0.02 < ((quantized - ref).norm() / ref.norm()).item() < 0.5  # quantized, and close

    sched = PrecisionSchedule(cfg, planned_tokens=100)
    assert sched.step(10, quant) is None and experts.mode == "quantized"
    msg = sched.step(60, quant)
    assert msg is not None and experts.mode == "forward_only"
    # forward_only: h = silu(bf16(x) bf16(W1)^T) * (bf16(x) bf16(W3)^T) per expert, then bf16(h) bf16(W2)^T
    xr = x.clone().requires_grad_(True)
    got = experts(xr, sizes)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    parts = []
    for e, xe in enumerate(_groups(x)):
        if SIZES[e]:
            h = F.silu(bf(xe) @ bf(experts.w1[e].detach()).t()) * (bf(xe) @ bf(experts.w3[e].detach()).t())
            parts.append(bf(h) @ bf(experts.w2[e].detach()).t())
    want = torch.cat(parts)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    got.sum().backward()
    xp = x.clone().requires_grad_(True)
    plain.layers["1"].feed_forward.experts(xp, sizes).sum().backward()
    assert ((xr.grad - xp.grad).norm() / xp.grad.norm()).item() > 1e-3  # backward still quantized

    assert set_precision_mode(quant, "bf16") == 10  # 2 blocks x (4 attention linears + their experts module)
    assert experts.mode == "bf16"
    assert torch.equal(experts(x, sizes), ref)
    assert torch.equal(experts(x, sizes), grouped_linear(
        F.silu(grouped_linear(x, experts.w1, sizes)) * grouped_linear(x, experts.w3, sizes), experts.w2, sizes))


def test_unsupported_expert_recipes_are_one_line_errors():
    for kw, field in ((dict(recipe="fp8_tensorwise", backend="torchao"), "precision.backend=torchao"),
                      (dict(recipe="fp8_tensorwise", backend="te"), "precision.backend=te")):
        with pytest.raises(HibariError, match=field) as err:
            _model(PrecisionConfig(bf16_first_layers=1, bf16_last_layers=1, **kw))
        assert "\n" not in str(err.value)


CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-mixtral.yaml"
SMALL = ["model.n_layers=3", "model.dim=32", "model.ffn_hidden_dim=32", "train.seq_length=32",
         "train.global_batch_size=4", "train.eval_interval=0", "log.progress=false", "log.plot=false",
         "precision.recipe=nvfp4", "precision.bf16_first_layers=1", "precision.bf16_last_layers=1"]


def _cfg(run_dir, *overrides):
    from megatron_ext.train.config import TrainConfig

    return load_config(TrainConfig, CONFIG, [f"run.dir={run_dir}", *SMALL, *overrides])


def test_tiny_mixtral_trains_in_nvfp4_and_resumes_bitwise(tmp_path):
    from megatron_ext.train.loop import train

    straight = train(_cfg(tmp_path / "a", "train.steps=6", "checkpoint.interval=0"))
    losses = straight["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[6] < losses[1] - 0.05
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
               if '"event"' not in line]
    assert records[-1]["expert_load"]  # the MoE ran (router metrics logged)
    train(_cfg(tmp_path / "b", "train.steps=6", "train.stop_at=3", "checkpoint.interval=3"))
    resumed = train(_cfg(tmp_path / "b", "train.steps=6", "checkpoint.interval=3"))
    assert resumed["resumed_from"].endswith("step_00000003")
    assert [resumed["losses"][s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]


def test_preflight_checks_expert_sizes_and_refuses_delayed_scaling_with_ep(tmp_path):
    from hibari.errors import ConfigError
    from megatron_ext.train.preflight import preflight

    preflight(_cfg(tmp_path / "ok", "precision.recipe=fp8_delayed"), 2, scan_tokens=False)  # ep=1: supported
    with pytest.raises(ConfigError, match="field parallel.ep: fp8_delayed keeps per-expert amax histories") as err:
        preflight(_cfg(tmp_path / "d", "precision.recipe=fp8_delayed", "parallel.ep=2"), 2, scan_tokens=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"experts layers\.1\.feed_forward\.experts\.w1, which are 32->40"):
        preflight(_cfg(tmp_path / "s", "model.ffn_hidden_dim=40"), 1, scan_tokens=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "s").exists()


def test_expert_parallel_nvfp4_experts_equal_one_process(tmp_path):
    """EP2 (each rank its own tokens; stochastic rounding keyed by the global expert and the expert replica, not
    the dp rank) gives bitwise the one-process outputs and gradients of the same experts on all tokens."""
    from mixtral_ep_worker import launch_quantized_experts

    for res in launch_quantized_experts(2, "nvfp4", tmp_path):
        diff = res["nvfp4"]
        assert 0.02 < diff.pop("quantized_vs_fp32") < 0.5
        assert diff == {"y": 0.0, "dx": 0.0, "dw1": 0.0, "dw2": 0.0, "dw3": 0.0}, diff


# ---------------------------------------------------------------------------------------------- fp8_delayed experts
STEP_SIZES = ([5, 0, 23, 12], [9, 7, 0, 24], [3, 11, 14, 12])  # expert 1 first used at step 2, expert 2 idle at 2
ROLE = {"x": 0, "w": 1, "dy": 2}  # recipes.ROLES: x_fwd, w_fwd, dy_dgrad


def _delayed_oracle_step(w1, w3, w2, x, dy, sizes, hist, length):
    """One step of SwiGLU experts under delayed scaling, by hand: per (expert, weight, operand) the scale amax is
    the max of that operand's last `length` amaxes (its current amax at its first use), then the current amax is
    recorded; E4M3 x / W, E5M2 dy, per-tensor; wgrad reuses the forward / dgrad quantized operands."""
    def q(key, t, grad=False):
        amax = t.abs().max()
        past = hist.setdefault(key, [])
        scale = max(past[-length:]) if past and length else amax  # length None: current scaling
        past.append(amax)
        return fp8.tensorwise(t, fp8.E5M2 if grad else fp8.E4M3, scale)

    ys, dxs, dws = [], [], {n: torch.zeros_like(w) for n, w in (("w1", w1), ("w3", w3), ("w2", w2))}
    for e, (xe, dye) in enumerate(zip(torch.split(x, sizes), torch.split(dy, sizes))):
        if not sizes[e]:
            continue
        x1, q1 = q((e, "w1", "x"), xe), q((e, "w1", "w"), w1[e])
        x3, q3 = q((e, "w3", "x"), xe), q((e, "w3", "w"), w3[e])
        y1, y3 = x1 @ q1.t(), x3 @ q3.t()
        h = F.silu(y1) * y3
        hq, q2 = q((e, "w2", "x"), h), q((e, "w2", "w"), w2[e])
        ys.append(hq @ q2.t())
        d2 = q((e, "w2", "dy"), dye, True)
        dh = d2 @ q2
        dws["w2"][e] = d2.t() @ hq
        sig = torch.sigmoid(y1)
        d1 = q((e, "w1", "dy"), dh * y3 * sig * (1 + y1 * (1 - sig)), True)
        d3 = q((e, "w3", "dy"), dh * F.silu(y1), True)
        dws["w1"][e], dws["w3"][e] = d1.t() @ x1, d3.t() @ x3
        dxs.append(d1 @ q1 + d3 @ q3)
    return torch.cat(ys), torch.cat(dxs), dws


def test_fp8_delayed_experts_match_a_hand_computed_delayed_scaling_oracle():
    """fp8_delayed on the experts: 3 steps with the activations' range changing each step (x1, x4, x1/4), so the
    history, not the current amax, sets the scales; per expert, weight and operand its own history, an expert with
    no tokens leaves its history alone. Forward and all gradients against the hand-computed formula."""
    length = 2
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 48)
    experts.init_weights(0.1, 0.05)
    experts.recipe = ExpertRecipes(PrecisionConfig(recipe="fp8_delayed", amax_history_len=length),
                                   {w: [100 * i + e for e in range(4)] for i, w in enumerate(("w1", "w3", "w2"))})
    experts.mode = "quantized"
    assert experts.amax_history.shape == (4, 3, 6, length) and experts.amax_count.shape == (4, 3, 6)
    hist, current = {}, {}
    g = torch.Generator().manual_seed(1)
    for step, (sizes, gain) in enumerate(zip(STEP_SIZES, (1.0, 4.0, 0.25))):
        x = torch.randn(sum(sizes), 32, generator=g) * gain
        dy = torch.randn(sum(sizes), 32, generator=g) * gain
        xr = x.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        set_step_context(experts, step=step)
        y = experts(xr, torch.tensor(sizes))
        y.backward(dy)
        ws = [experts.w1.detach(), experts.w3.detach(), experts.w2.detach()]
        want_y, want_dx, want_dw = _delayed_oracle_step(*ws, x, dy, sizes, hist, length)
        cur_y, _, _ = _delayed_oracle_step(*ws, x, dy, sizes, current, None)  # current scaling
        got = {"y": y.detach(), "dx": xr.grad, **{n: getattr(experts, n).grad for n in ("w1", "w3", "w2")}}
        for name, want in {"y": want_y, "dx": want_dx, **want_dw}.items():
            err = ((got[name] - want).norm() / want.norm()).item()
            assert err < 1e-4, (step, name, err)
        if step:  # the history really sets the scale: current scaling gives other numbers
            assert ((got["y"] - cur_y).norm() / cur_y.norm()).item() > 1e-3
        for e in range(4):
            if not sizes[e]:
                assert all(torch.equal(getattr(experts, n).grad[e], torch.zeros_like(want_dw[n][e]))
                           for n in ("w1", "w3", "w2"))
        with torch.no_grad():  # a plain SGD step, so the weights' amaxes move too
            for p in experts.parameters():
                p -= 0.5 * p.grad
    used = torch.tensor([[sum(1 for s in STEP_SIZES if s[e])] * 3 for e in range(4)])
    assert torch.equal(experts.amax_count[:, :, :3], used[:, :, None].expand(4, 3, 3))
    assert not experts.amax_count[:, :, 3:].any()  # the wgrad reuses the forward / dgrad operands
    for (e, w, role), amaxes in hist.items():  # the ring holds the last `length` amaxes in slot order
        ring = experts.amax_history[e, ("w1", "w3", "w2").index(w), ROLE[role]]
        want = torch.zeros(length)
        for i, a in enumerate(amaxes):
            want[i % length] = a
        assert torch.allclose(ring, want, rtol=1e-5, atol=0), (e, w, role)  # h, dy_1/3: fp32 op order
    assert {k for k in experts.state_dict() if "amax" in k} == {"amax_history", "amax_count"}


def test_tiny_mixtral_trains_in_fp8_delayed_and_resumes_bitwise(tmp_path):
    """The experts' amax histories are in the checkpoint and restored: stop at step 2, rerun == uninterrupted."""
    from megatron_ext.checkpoint import iter_model_tensors
    from megatron_ext.train.loop import train

    delayed = ["precision.recipe=fp8_delayed", "precision.amax_history_len=2", "train.steps=4"]
    straight = train(_cfg(tmp_path / "a", *delayed, "checkpoint.interval=0"))
    losses = straight["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    train(_cfg(tmp_path / "b", *delayed, "train.stop_at=2", "checkpoint.interval=2"))
    saved = dict(iter_model_tensors(tmp_path / "b" / "checkpoints" / "step_00000002"))
    hist = saved["layers.1.feed_forward.experts.amax_history"]
    assert hist.shape == (MOE["n_experts"], 3, 6, 2) and hist[:, :, :3].gt(0).any()
    assert "layers.0.feed_forward.experts.amax_history" not in saved  # bf16_first_layers=1: no recipe there
    resumed = train(_cfg(tmp_path / "b", *delayed, "checkpoint.interval=2"))
    assert resumed["resumed_from"].endswith("step_00000002")
    assert [resumed["losses"][s] for s in (3, 4)] == [losses[s] for s in (3, 4)]


def test_data_parallel_fp8_delayed_experts_hold_one_history_equal_to_one_process(tmp_path):
    """dp2 (no EP), each rank its own tokens, amaxes MAX-reduced over dp: both ranks hold bitwise the same expert
    histories, equal to one process running the same experts on all tokens (its amax over all tokens = the max of
    the ranks'); an expert no rank routed to stays untouched, one with tokens on a single rank advances on both;
    outputs and (summed) gradients match the one process's."""
    from mixtral_delayed_worker import launch_dp_delayed_experts

    r0, r1 = launch_dp_delayed_experts(tmp_path)
    assert r0["history"] == r1["history"] and r0["count"] == r1["count"]  # one copy is the checkpoint
    assert r0["count"] == r0["single_count"]
    count = torch.tensor(r0["count"])
    assert not count[2].any() and count[[0, 1, 3], :, :3].eq(3).all()  # expert 2: never routed to
    hist, want = torch.tensor(r0["history"]), torch.tensor(r0["single_history"])
    assert torch.allclose(hist, want, rtol=1e-6, atol=0) and hist[[0, 1, 3], :, :3].gt(0).all()
    for res in (r0, r1):
        assert all(err < 1e-5 for err in res["errors"].values()), res["errors"]


def test_fp8_delayed_experts_under_activation_checkpointing_equal_no_recompute(tmp_path):
    """The expert forwards recomputed in backward replay their recorded scales and record nothing: losses and the
    checkpointed weights and histories equal a run without recompute bit for bit."""
    from megatron_ext.checkpoint import iter_model_tensors
    from megatron_ext.train.loop import train

    delayed = ["precision.recipe=fp8_delayed", "precision.amax_history_len=2", "train.steps=3", "checkpoint.interval=3"]
    plain = train(_cfg(tmp_path / "a", *delayed))
    recomputed = train(_cfg(tmp_path / "b", *delayed, "parallel.activation_checkpoint=full"))
    assert recomputed["losses"] == plain["losses"]
    a, b = (dict(iter_model_tensors(tmp_path / r / "checkpoints" / "step_00000003")) for r in ("a", "b"))
    assert a.keys() == b.keys() and "layers.1.feed_forward.experts.amax_count" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
