"""Quantized linear layer (NVFP4 / FP8 emulation), apply_precision on hibari's Llama, the precision schedule."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hibari.config import validate
from hibari.errors import ConfigError, HibariError
from megatron_ext.models import ModelArgs, Transformer
from megatron_ext.precision import (PrecisionConfig, PrecisionSchedule, QuantizedLinear, apply_precision,
                                    quantized_block_names)
from megatron_ext.precision import fp8, nvfp4
from megatron_ext.precision.hadamard import apply_rht
from megatron_ext.precision.linear import RECIPES, quantized_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(vocab_size=128, dim=64, n_layers=4, n_heads=4, ffn_hidden_dim=128, max_seq_len=64)


def _recipe(name="nvfp4", seed=0, **kw):
    cfg = PrecisionConfig(recipe=name, **kw)
    return RECIPES[name](cfg, seed)


def _operands(t=64, k=64, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.1
    dy = torch.randn(t, n, generator=g)
    return x, w, dy


def _run(recipe, x, w, dy, mode="quantized"):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = quantized_linear(x, w, recipe, mode)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _assert_gemm_matches_emulation(got, a, b):
    """The bf16 GEMM on exact unscaled operands vs today's fp32 emulation (fake-quantized fp32 operands, fp32 GEMM)
    of the same product a @ b^T: both accumulate in fp32, so elementwise |got - a b^T| <= 2 (K + 3) 2^-24 (|a| |b|^T)
    (K - 1 roundings of the sums, one per operand element and product, two for the per-tensor factors)."""
    k = a.shape[1]
    want = a @ b.t()
    bound = 2 * (k + 3) * 2.0 ** -24 * (a.double().abs() @ b.double().abs().t())
    err = (got.double() - want.double()).abs()
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item()}"
    return (err / bound.clamp(min=1e-30)).max().item()


def test_nvfp4_linear_wiring_is_exactly_the_recipe():
    """fprop x 1x16 RNE . W 16x16 RNE; dgrad Q(dy) 1x16 . same Q(W); wgrad Q(RHT(dy^T)) . Q(RHT(x^T))^T: every
    operand bit-identical to the quantizer's output, every GEMM within the fp32 accumulation bound of the emulation."""
    x, w, dy = _operands(t=40)  # 40 tokens: wgrad operands are zero-padded to 48
    rec = _recipe(stochastic_rounding=False)
    rec.capture = {}
    y, dx, dw = _run(rec, x, w, dy)
    wq = nvfp4.fake_quantize(w, (16, 16))
    a = apply_rht(F.pad(dy.t(), (0, 8)), rec.rht)
    b = apply_rht(F.pad(x.t(), (0, 8)), rec.rht)
    want = {"x_fwd": nvfp4.fake_quantize(x), "w_fwd": wq, "dy_dgrad": nvfp4.fake_quantize(dy),
            "dy_wgrad": nvfp4.fake_quantize(a), "x_wgrad": nvfp4.fake_quantize(b)}
    for role, value in want.items():
        assert torch.equal(rec.capture[role], value), role
    _assert_gemm_matches_emulation(y, want["x_fwd"], wq)
    _assert_gemm_matches_emulation(dx, want["dy_dgrad"], wq.t())
    _assert_gemm_matches_emulation(dw, want["dy_wgrad"], want["x_wgrad"])


def test_nvfp4_ablation_switches_change_the_operands():
    x, w, dy = _operands()
    no2d = _recipe(weight_2d=False, stochastic_rounding=False, rht=False)
    no2d.capture = {}
    y, dx, dw = _run(no2d, x, w, dy)
    assert torch.equal(no2d.capture["w_fwd"], nvfp4.fake_quantize(w))
    _assert_gemm_matches_emulation(y, nvfp4.fake_quantize(x), nvfp4.fake_quantize(w))
    # without 2D tiles dgrad quantizes W^T along its own reduction dim: fprop and dgrad see different weights
    w_dgrad = nvfp4.fake_quantize(w.t().contiguous())
    assert torch.equal(no2d.capture["w_dgrad"], w_dgrad)
    _assert_gemm_matches_emulation(dx, nvfp4.fake_quantize(dy), w_dgrad)
    _assert_gemm_matches_emulation(dw, nvfp4.fake_quantize(dy.t().contiguous()),
                                   nvfp4.fake_quantize(x.t().contiguous()))
    # stochastic rounding: reproducible per layer seed, differs between seeds
    _, dx1, _ = _run(_recipe(seed=3), x, w, dy)
    _, dx2, _ = _run(_recipe(seed=3), x, w, dy)
    _, dx3, _ = _run(_recipe(seed=4), x, w, dy)
    assert torch.equal(dx1, dx2) and not torch.equal(dx1, dx3)


def test_nvfp4_gemm_error_vs_emulation_on_large_k():
    """The stated tolerance holds at a realistic reduction length (K = 1024), and the observed error is far below
    the worst case."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(64, 1024, generator=g), torch.randn(32, 1024, generator=g) * 0.02
    rec = _recipe(stochastic_rounding=False)
    y = quantized_linear(x, w, rec)
    ratio = _assert_gemm_matches_emulation(y, nvfp4.fake_quantize(x), nvfp4.fake_quantize(w, (16, 16)))
    assert ratio < 0.1


def test_nvfp4_linear_autograd_close_to_bf16():
    """Stated tolerances (Gaussian data, 128 tokens, all switches on), vs the fp32 GEMMs: relative Frobenius error
    <= 0.16 for y (two RNE operands, ~0.096 each) and <= 0.20 for dx, dW (stochastic rounding adds variance;
    measured 0.145 / 0.18 / 0.17); cosine similarity >= 0.98. bf16 itself is ~0.003."""
    x, w, dy = _operands(t=128, k=128, n=64, seed=1)
    rec = _recipe()
    y, dx, dw = _run(rec, x, w, dy)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yr = xr @ wr.t()
    yr.backward(dy)
    yb = (x.bfloat16() @ w.bfloat16().t()).float()
    assert _rel(yb, yr) < 0.005
    for got, ref, tol in ((y, yr.detach(), 0.16), (dx, xr.grad, 0.2), (dw, wr.grad, 0.2)):
        assert _rel(got, ref) < tol
        assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.98


def test_nvfp4_stochastic_wgrad_is_unbiased_on_average():
    x, w, dy = _operands(t=64, k=32, n=32, seed=2)
    rec = _recipe(rht=False)
    ref = dy.t() @ x
    single = _run(rec, x, w, dy)[2]
    mean = torch.stack([_run(rec, x, w, dy)[2] for _ in range(64)]).mean(0)
    rne = _run(_recipe(rht=False, stochastic_rounding=False), x, w, dy)[2]
    # averaging SR draws removes the dy rounding error; the x operand (RNE) error remains
    assert _rel(mean, ref) < 0.6 * _rel(single, ref)
    assert _rel(mean, ref) < _rel(rne, ref)


def test_forward_only_and_bf16_modes():
    x, w, dy = _operands()
    rec = _recipe(stochastic_rounding=False)
    y, dx, _ = _run(rec, x, w, dy, mode="forward_only")
    assert torch.equal(y, x.bfloat16().float() @ w.bfloat16().float().t())
    # backward stays NVFP4
    _assert_gemm_matches_emulation(dx, nvfp4.fake_quantize(dy), nvfp4.fake_quantize(w, (16, 16)).t())
    lin = nn.Linear(64, 48, bias=False)
    q = QuantizedLinear.from_linear(lin, rec, mode="bf16")
    assert q.weight is lin.weight
    assert torch.equal(q(x), lin(x))
    q.mode = "quantized"
    assert not torch.equal(q(x), lin(x))


def test_quantized_linear_under_autocast_returns_bf16_and_fp32_grads():
    x, w, dy = _operands()
    q = QuantizedLinear.from_linear(nn.Linear(64, 48, bias=True), _recipe())
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(xr)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert xr.grad.dtype == torch.float32 and q.weight.grad.dtype == torch.float32 and q.bias.grad is not None


def test_fp8_quantizers():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 3
    t = fp8.tensorwise(x)
    scale = 448.0 / x.abs().max()
    assert torch.equal(t, (x * scale).to(torch.float8_e4m3fn).float() / scale)
    assert t.abs().max() == x.abs().max()  # the amax maps to 448 exactly
    r = fp8.rowwise(x)
    row_scale = torch.exp2(torch.floor(torch.log2(448.0 / x.abs().amax(-1, keepdim=True))))
    assert torch.equal(r, (x * row_scale).to(torch.float8_e4m3fn).float() / row_scale)
    # MXFP8: the E8M0 exponent is floor(log2(bmax)) - 8, not rounded to nearest (1.9 * 2^3 -> 2^(3 - 8))
    blk = torch.zeros(1, 32)
    blk[0, 0], blk[0, 1] = 1.9 * 8, 0.3
    assert fp8.mx_block_exponents(blk).item() == 3 - 8
    assert torch.equal(fp8.mxfp8(blk), blk.div(2.0 ** -5).to(torch.float8_e4m3fn).float().mul(2.0 ** -5))
    assert fp8.mx_block_exponents(torch.zeros(1, 32)).item() == 0
    # E5M2 gradients saturate instead of overflowing to inf
    assert torch.isfinite(fp8.tensorwise(x, fp8.E5M2, amax=torch.tensor(1e-3))).all()


def test_fp8_delayed_scaling_uses_the_amax_history():
    rec = _recipe("fp8_delayed", amax_history_len=4)
    from megatron_ext.precision.recipes import ShardContext as _Ctx
    a = torch.full((2, 16), 1.0)
    first = rec.quant("x_fwd", a, _Ctx())
    assert torch.equal(first, a)  # first use: current amax
    big = torch.full((2, 16), 100.0)
    rec.quant("x_fwd", big, _Ctx())  # scaled with the history max (1.0): saturates at 448
    assert rec.capture is None
    out = rec.quant("x_fwd", a, _Ctx())  # history max is now 100: 1.0 * 4.48 rounds in E4M3
    assert torch.equal(out, fp8.tensorwise(a, fp8.E4M3, torch.tensor(100.0)))
    assert rec.state()["count"]["x_fwd"] == 3


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8"])
def test_fp8_linears_are_close_to_fp32(recipe):
    x, w, dy = _operands(t=64, k=64, n=64, seed=5)
    y, dx, dw = _run(_recipe(recipe, hadamard=(recipe == "fp8_tensorwise")), x, w, dy)
    for got, ref in ((y, x @ w.t()), (dx, dy @ w), (dw, dy.t() @ x)):
        assert _rel(got, ref) < (0.08 if recipe != "fp8_tensorwise" else 0.12)
        assert _rel(got, ref) > 1e-4  # it really is quantized


def test_torchao_backend_matches_emulated_tensorwise_forward():
    pytest.importorskip("torchao.float8", reason="torchao not installed (optional backend=torchao)")
    torch.manual_seed(0)
    m1, m2 = Transformer(ModelArgs(**TINY)), Transformer(ModelArgs(**TINY))
    m2.load_state_dict(m1.state_dict())
    apply_precision(m1, PrecisionConfig(recipe="fp8_tensorwise", backend="torchao"))
    apply_precision(m2, PrecisionConfig(recipe="fp8_tensorwise"))
    assert type(m1.layers["1"].attention.wq).__name__ == "Float8Linear"
    tok = torch.randint(0, 128, (2, 32))
    a, b = m1(tok), m2(tok)
    assert _rel(a, b) < 1e-3
    # a switch to BF16 swaps torchao's modules back to nn.Linear with the same Parameters
    w = m1.layers["1"].attention.wq.weight
    sched = PrecisionSchedule(PrecisionConfig(recipe="fp8_tensorwise", backend="torchao", switch_at=0.5,
                                              switch_mode="bf16"), planned_tokens=100)
    assert sched.step(60, m1) is not None
    assert type(m1.layers["1"].attention.wq) is nn.Linear and m1.layers["1"].attention.wq.weight is w


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**TINY))


def test_apply_precision_on_llama_swaps_only_the_selected_block_linears():
    model = _tiny_model()
    keys = list(model.state_dict().keys())
    params = {n: p for n, p in model.named_parameters()}
    cfg = PrecisionConfig(recipe="nvfp4", bf16_first_layers=1, bf16_last_layers=1)
    assert apply_precision(model, cfg) is model
    assert quantized_block_names(model, cfg) == ["layers.1", "layers.2"]
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert quantized == sorted(f"layers.{i}.{s}" for i in (1, 2) for s in
                               ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert type(model.output) is nn.Linear and type(model.layers["0"].attention.wq) is nn.Linear
    assert type(model.layers["3"].feed_forward.w2) is nn.Linear
    # checkpoints unchanged: same keys, same Parameter objects (master weights only, no quantized state)
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    # per-layer seeds differ (Hadamard signs / SR streams)
    assert not torch.equal(model.layers["1"].attention.wq.recipe.rht, model.layers["2"].attention.wq.recipe.rht)


def test_llama_trains_a_few_steps_in_nvfp4_and_stays_close_to_bf16():
    losses = {}
    tok = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    for recipe in ("bf16", "nvfp4"):
        model = apply_precision(_tiny_model(), PrecisionConfig(recipe=recipe, bf16_first_layers=0,
                                                               bf16_last_layers=1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tok[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tok[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[recipe] = loss.item()
    assert losses["nvfp4"] < 4.6  # it learned (ln 128 = 4.85 at init)
    assert abs(losses["nvfp4"] - losses["bf16"]) / losses["bf16"] < 0.05


def test_apply_precision_errors_and_noop_recipes():
    model = _tiny_model()
    for recipe in ("fp32", "bf16"):
        apply_precision(model, PrecisionConfig(recipe=recipe))
        assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.raises(HibariError, match="bf16_first_layers"):
        apply_precision(model, PrecisionConfig(recipe="nvfp4", bf16_first_layers=2, bf16_last_layers=2))
    with pytest.raises(HibariError, match="multiples of 16"):
        apply_precision(Transformer(ModelArgs(**{**TINY, "ffn_hidden_dim": 120})),
                        PrecisionConfig(recipe="nvfp4", bf16_first_layers=0, bf16_last_layers=0))
    with pytest.raises(HibariError, match="no `layers`"):
        apply_precision(nn.Sequential(nn.Linear(16, 16)), PrecisionConfig(recipe="nvfp4"))


def test_precision_config_validation_is_one_line():
    cfg = validate(PrecisionConfig, {"recipe": "nvfp4", "switch_at": 0.8})
    assert cfg.switch_mode == "forward_only" and cfg.quantized
    for bad in ({"recipe": "fp4"}, {"switch_at": 1.5}, {"rht": "maybe"}, {"hadamrd": True}):
        with pytest.raises(ConfigError) as err:
            validate(PrecisionConfig, bad, source="train.yaml")
        assert "\n" not in str(err.value) and str(err.value).startswith("train.yaml: field ")


@pytest.mark.parametrize("switch_mode", ["forward_only", "bf16"])
def test_precision_schedule_switches_once_and_survives_resume(switch_mode):
    cfg = PrecisionConfig(recipe="nvfp4", switch_at=0.75, switch_mode=switch_mode)
    model = apply_precision(_tiny_model(), cfg)
    sched = PrecisionSchedule(cfg, planned_tokens=1000)
    assert sched.current_mode == "nvfp4"
    assert sched.step(500, model) is None and sched.step(749, model) is None
    msg = sched.step(760, model)
    assert msg is not None and "760 tokens" in msg and "76.0%" in msg
    assert sched.step(800, model) is None  # only once
    want = "bf16" if switch_mode == "bf16" else "forward_only"
    modes = {m.mode for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert modes == {want}
    assert sched.current_mode == ("bf16" if switch_mode == "bf16" else "bf16_fwd+nvfp4_bwd")
    # resume: a fresh model + schedule from the checkpointed state continue in the switched mode
    state = sched.state_dict()
    model2 = apply_precision(_tiny_model(), cfg)
    sched2 = PrecisionSchedule(cfg, planned_tokens=1000)
    sched2.load_state_dict(state)
    assert sched2.current_mode == sched.current_mode
    assert sched2.step(810, model2) is None
    assert {m.mode for m in model2.modules() if isinstance(m, QuantizedLinear)} == {want}
    with pytest.raises(HibariError, match="recipe"):
        PrecisionSchedule(PrecisionConfig(recipe="fp8_tensorwise"), 1000).load_state_dict(state)


def test_precision_schedule_switches_every_model_part():
    """Pipeline ranks hold several stages: each part passed to step() is switched, and each reports the switch."""
    cfg = PrecisionConfig(recipe="nvfp4", switch_at=0.5)
    parts = [apply_precision(_tiny_model(), cfg), apply_precision(_tiny_model(), cfg)]
    sched = PrecisionSchedule(cfg, planned_tokens=100)
    assert [sched.step(10, p) for p in parts] == [None, None]
    msgs = [sched.step(60, p) for p in parts]
    assert all(m is not None and "60 tokens" in m for m in msgs)
    assert all(m.mode == "forward_only" for p in parts for m in p.modules() if isinstance(m, QuantizedLinear))
    assert [sched.step(70, p) for p in parts] == [None, None]


def test_forward_only_switch_recovers_forward_precision():
    cfg = PrecisionConfig(recipe="nvfp4", bf16_first_layers=0, bf16_last_layers=0, switch_at=0.5)
    ref = _tiny_model()
    model = apply_precision(_tiny_model(), cfg)
    tok = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        want = ref(tok)
        before = _rel(model(tok), want)
        PrecisionSchedule(cfg, 100).step(50, model)
        after = _rel(model(tok), want)
    assert after < before / 5
