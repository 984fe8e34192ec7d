"""The quantized GEMM paths: batched NVFP4 quantization, memory saved for backward, no host syncs, FP8 backends
(`torch._scaled_mm` vs emulation, selection rules), TransformerEngine recipe mapping, backend validation."""

import types

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from hibari.config import validate
from hibari.errors import ConfigError, HibariError
from megatron_ext.precision import PrecisionConfig, QuantizedLinear, apply_precision, nvfp4, set_step_context
from megatron_ext.precision.gemm import use_scaled_mm
from megatron_ext.precision.linear import RECIPES, quantized_linear
from megatron_ext.precision.rounding import counter_uniforms
from megatron_ext.precision.te_backend import te_recipe_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_RECIPES = ("nvfp4", "fp8_tensorwise", "fp8_delayed", "fp8_rowwise", "mxfp8")


def test_quantize_many_equals_one_tensor_at_a_time():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 48, generator=g) * 3
    w = torch.randn(32, 64, generator=g) * 0.05
    w[17, 20] = 2.0
    b = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    q = nvfp4.quantize_many([a, w, b], [1, 16, 1], want_codes=[True] * 3, values_dtype=torch.float32)
    for i, (t, tile) in enumerate(((a, (1, 16)), (w, (16, 16)), (b, (1, 16)))):
        one = nvfp4.quantize(t, tile)
        assert torch.equal(q.codes[i], one.codes)
        assert torch.equal(q.scales[i][::tile[0]].view(torch.uint8), one.scales.view(torch.uint8))
        assert torch.equal(q.amax[i], one.amax)
        assert torch.equal(q.values[i], one.dequantize_unscaled())
    u = [counter_uniforms(5, 32, 48), counter_uniforms(6, 16, 32)]
    qs = nvfp4.quantize_many([a, b], [1, 1], "stochastic", uniforms=u, want_codes=[True, True])
    for i, t in enumerate((a, b)):
        assert torch.equal(qs.codes[i], nvfp4.quantize(t, rounding="stochastic", uniforms=u[i]).codes)


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward, except those sharing a Parameter's storage (no new
    memory: the weight itself)."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.total = 0

    def pack(self, t):
        if t.untyped_storage().data_ptr() not in self.param_ptrs:
            self.total += t.numel() * t.element_size()
        return t

    def measure(self, module, x):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
        y.float().sum().backward()
        return self.total


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_bytes_saved_for_backward_are_at_most_bf16s(recipe):
    """bf16 (nn.Linear under autocast) saves x and W in bf16: 2 (T K + N K) bytes. NVFP4 saves packed codes +
    E4M3 scales (0.5625 byte / element), FP8 tensorwise its 1-byte codes; no recipe saves an fp32 copy."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    bf16 = _SavedBytes(lin.parameters()).measure(lin, x)
    assert bf16 == 2 * (64 * 256 + 128 * 256)
    q = QuantizedLinear.from_linear(lin, RECIPES[recipe](PrecisionConfig(recipe=recipe), 0))
    got = _SavedBytes(lin.parameters()).measure(q, x)
    assert got <= bf16
    if recipe == "nvfp4":
        assert got <= 0.5625 * (64 * 256 + 128 * 256) + 64
    if recipe == "fp8_tensorwise":
        assert got <= 64 * 256 + 128 * 256 + 64


class _HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_quantized_linear_forward_backward_has_no_host_sync(recipe):
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    model[0] = QuantizedLinear.from_linear(model[0], RECIPES[recipe](PrecisionConfig(recipe=recipe), 0))
    set_step_context(model, step=3, micro_batch=1, dp_rank=0)
    x = torch.randn(2, 40, 64, requires_grad=True)  # 80 tokens: the wgrad operands get padded
    counter = _HostSyncs()
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
    assert counter.n == 0
    assert x.grad is not None and model[0].weight.grad is not None


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8_tensorwise"])
def test_non_finite_input_gives_non_finite_output_without_raising(recipe):
    """No finiteness check on the device path (it would be a host sync): an Inf/NaN reaches the output, where the
    training loop's loss check reports it."""
    rec = RECIPES[recipe](PrecisionConfig(recipe=recipe), 0)
    x = torch.randn(16, 32)
    x[3, 4] = float("inf")
    y = quantized_linear(x, torch.randn(16, 32) * 0.1, rec)
    assert not torch.isfinite(y).all()
    with pytest.raises(ValueError, match="NaN or Inf"):  # the standalone quantizer still says so
        nvfp4.quantize(x)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backend_selection_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not use_scaled_mm("auto", cpu) and not use_scaled_mm("emulated", cpu)
    assert use_scaled_mm("scaled_mm", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert use_scaled_mm("auto", cuda) is want, capability
        assert not use_scaled_mm("emulated", cuda)


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise"])
def test_scaled_mm_backend_matches_the_emulation(recipe):
    """torch 2.13 runs _scaled_mm on CPU too, so the GPU code path is exercised here: same operands bit for bit,
    GEMM outputs equal up to fp32 summation order."""
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(64, 96, generator=g), torch.randn(48, 96, generator=g) * 0.1, torch.randn(64, 48, generator=g)
    outs = {}
    for backend in ("emulated", "scaled_mm"):
        rec = RECIPES[recipe](PrecisionConfig(recipe=recipe, backend=backend), 0)
        rec.capture = {}
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ops = _OpNames()
        with ops:
            y = quantized_linear(xr, wr, rec)
            y.backward(dy)
        outs[backend] = (y.detach(), xr.grad, wr.grad, rec.capture, ops.names.count("_scaled_mm"))
    (y0, dx0, dw0, c0, n0), (y1, dx1, dw1, c1, n1) = outs["emulated"], outs["scaled_mm"]
    assert (n0, n1) == (0, 3)  # the three GEMMs really ran through _scaled_mm
    assert c0.keys() == c1.keys() and all(torch.equal(c0[k], c1[k]) for k in c0)
    for a, b in ((y0, y1), (dx0, dx1), (dw0, dw1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backend_config_validation_is_one_line():
    for bad, fragment in (({"recipe": "nvfp4", "backend": "torchao"}, "backend torchao runs recipes"),
                          ({"recipe": "fp8_rowwise", "backend": "te"}, "not fp8_rowwise"),
                          ({"recipe": "nvfp4", "backend": "te", "switch_at": 0.8}, "switch_mode bf16 only"),
                          ({"backend": "cuda"}, "'auto', 'emulated', 'scaled_mm', 'torchao' or 'te'")):
        with pytest.raises(ConfigError) as err:
            validate(PrecisionConfig, bad, source="train.yaml")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("train.yaml: field backend: ") and fragment in msg, msg
    validate(PrecisionConfig, {"recipe": "nvfp4", "backend": "te", "switch_at": 0.8, "switch_mode": "bf16"})


def test_te_backend_without_transformer_engine_is_a_one_line_error():
    try:  # TE is never installed on CPU CI; where it is, the missing-package message cannot be checked
        import transformer_engine  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TransformerEngine installed: the missing-package message cannot be checked")
    from megatron_ext.models import ModelArgs, Transformer

    model = Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_hidden_dim=64, max_seq_len=16))
    with pytest.raises(HibariError, match="needs TransformerEngine") as err:
        apply_precision(model, PrecisionConfig(recipe="nvfp4", backend="te"))
    assert "\n" not in str(err.value)


def test_te_recipe_mapping():
    """hibari's switches map onto TE's recipe objects (checked against a stand-in of TE's recipe module)."""
    class Rec:
        def __init__(self, **kw):
            self.kw = kw

    class NVFP4(Rec):
        disable_rht = disable_stochastic_rounding = disable_2d_quantization = False

    te_recipe = types.SimpleNamespace(
        Format=types.SimpleNamespace(HYBRID="HYBRID"), Float8CurrentScaling=type("CS", (Rec,), {}),
        DelayedScaling=type("DS", (Rec,), {}), MXFP8BlockScaling=type("MX", (Rec,), {}), NVFP4BlockScaling=NVFP4)
    assert te_recipe_for(PrecisionConfig(recipe="fp8_tensorwise"), te_recipe).kw == {"fp8_format": "HYBRID"}
    ds = te_recipe_for(PrecisionConfig(recipe="fp8_delayed", amax_history_len=16), te_recipe)
    assert ds.kw == {"fp8_format": "HYBRID", "amax_history_len": 16, "amax_compute_algo": "max"}
    assert type(te_recipe_for(PrecisionConfig(recipe="mxfp8"), te_recipe)).__name__ == "MX"
    nv = te_recipe_for(PrecisionConfig(recipe="nvfp4", rht=False, weight_2d=False), te_recipe)
    assert (nv.disable_rht, nv.disable_stochastic_rounding, nv.disable_2d_quantization) == (True, False, True)
    with pytest.raises(HibariError, match="not fp8_rowwise"):
        te_recipe_for(PrecisionConfig(recipe="fp8_rowwise"), te_recipe)
