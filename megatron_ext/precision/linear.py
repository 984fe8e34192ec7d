"""Quantized linear layer: emulated NVFP4 / FP8 GEMMs for fprop, dgrad and wgrad.

Each GEMM operand is arranged so that the GEMM reduction dimension is its LAST dimension, then fake-quantized
(quantize + exact dequantize to float32) by the layer's recipe, and the GEMM runs in float32. For NVFP4 the
dequantized values (E2M1 x E4M3) are exact in bf16, so this equals a bf16 GEMM with fp32 accumulation followed by the
per-tensor factors, which is what hardware without FP4 tensor cores (CPU, H100) can do.

    fprop  y  = Q(x)[T,K]          @ Q(W)[N,K]^T
    dgrad  dx = Q(dy)[T,N]         @ Q(W^T)[K,N]^T     (NVFP4 2D / FP8 tensorwise: the fprop Q(W) is reused)
    wgrad  dW = Q(RHT(dy^T))[N,T]  @ Q(RHT(x^T))[K,T]^T  (token dim padded with zeros to a block multiple)

Tensor parallel: when the weight is a DTensor (ColwiseParallel / RowwiseParallel, with or without sequence
parallel), the layer computes on local shards and reduces each operand's amax with MAX over the TP group, so a
sharded layer quantizes exactly as the unsharded one would (stochastic-rounding draws are per rank, so only the
deterministic RNE paths, i.e. the forward, are bit-identical across TP sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_ext.precision import fp8, nvfp4
from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.precision.hadamard import apply_rht, random_signs, rht_matrix

MODES = ("quantized", "forward_only", "bf16")
ROLES = ("x_fwd", "w_fwd", "dy_dgrad", "w_dgrad", "dy_wgrad", "x_wgrad")


class _Ctx:
    """Where the operands live: the TP group (or None), the roles whose rows (not their reduction dim) are sharded,
    and the roles that are replicated on every rank (their amax needs no reduction)."""

    def __init__(self, group=None, row_sharded: frozenset = frozenset(), replicated: frozenset = frozenset()):
        self.group = group
        self.row_sharded = row_sharded
        self.replicated = replicated

    def reduce_max(self, t: torch.Tensor, role: str | None = None) -> torch.Tensor:
        if self.group is not None and role not in self.replicated:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t


def _global_amax(t: torch.Tensor, ctx: _Ctx, role: str) -> torch.Tensor:
    return ctx.reduce_max(nvfp4.tensor_amax(t), role)


class Recipe:
    """Fake quantizer per operand role. Subclasses set the tile/block multiple and weight reuse."""

    name = "base"
    block = 16  # token-dim padding multiple for wgrad operands
    reuse_weight_for_dgrad = True

    def __init__(self, cfg: PrecisionConfig, layer_seed: int):
        self.cfg = cfg
        self.use_rht = False
        self.rht = rht_matrix(random_signs(layer_seed))
        self.capture: dict | None = None

    def quant(self, role: str, t: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        q = self._quant(role, t, ctx)
        if self.capture is not None:  # debugging / tests: keep the last quantized operand of each role
            self.capture[role] = q.detach().clone()
        return q

    def _quant(self, role: str, t: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        return {}


class NVFP4Recipe(Recipe):
    name = "nvfp4"

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.rht
        self.reuse_weight_for_dgrad = cfg.weight_2d
        # one generator per layer, seeded from the run seed and the layer position: reproducible across resumes
        self.generator = torch.Generator().manual_seed(layer_seed + 7919)

    def _quant(self, role, t, ctx):
        stochastic = self.cfg.stochastic_rounding and role.startswith("dy")
        tile = (16, 16) if (role == "w_fwd" and self.cfg.weight_2d) else (1, 16)
        gen = self.generator
        if stochastic and t.device.type != "cpu":
            gen = None  # a CPU generator cannot drive a CUDA rand; the global CUDA RNG is used instead
        return nvfp4.fake_quantize(t, tile, "stochastic" if stochastic else "rne", gen, _global_amax(t, ctx, role))


def _fp8_dtype(role: str, hybrid: bool):
    return fp8.E5M2 if (hybrid and role.startswith("dy")) else fp8.E4M3


class FP8TensorwiseRecipe(Recipe):
    name = "fp8_tensorwise"

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _quant(self, role, t, ctx):
        return fp8.tensorwise(t, _fp8_dtype(role, True), _global_amax(t, ctx, role))


class FP8DelayedRecipe(FP8TensorwiseRecipe):
    """Scale from the max over the last `amax_history_len` amaxes of this operand (current amax on the first use)."""

    name = "fp8_delayed"

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.history = {r: torch.zeros(cfg.amax_history_len) for r in ROLES}
        self.count = {r: 0 for r in ROLES}

    def _quant(self, role, t, ctx):
        amax = _global_amax(t, ctx, role)
        hist = self.history[role]
        scale_amax = amax if self.count[role] == 0 else hist.max()
        hist[self.count[role] % hist.numel()] = amax.to(hist.device)
        self.count[role] += 1
        return fp8.tensorwise(t, _fp8_dtype(role, True), scale_amax.to(t.device))

    def state(self):
        return {"history": {r: h.clone() for r, h in self.history.items()}, "count": dict(self.count)}


class FP8RowwiseRecipe(Recipe):
    name = "fp8_rowwise"
    reuse_weight_for_dgrad = False

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _quant(self, role, t, ctx):
        amax_rows = fp8.row_amax(t)
        if role not in ctx.row_sharded:  # rows are whole on every rank only when the reduction dim is sharded
            amax_rows = ctx.reduce_max(amax_rows, role)
        return fp8.rowwise(t, fp8.E4M3, amax_rows)


class MXFP8Recipe(Recipe):
    name = "mxfp8"
    block = fp8.MX_BLOCK
    reuse_weight_for_dgrad = False

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _quant(self, role, t, ctx):
        return fp8.mxfp8(t, fp8.E4M3)


RECIPES = {r.name: r for r in (NVFP4Recipe, FP8TensorwiseRecipe, FP8DelayedRecipe, FP8RowwiseRecipe, MXFP8Recipe)}


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-t.shape[-1]) % multiple
    return F.pad(t, (0, extra)) if extra else t


class _QuantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, recipe, mode, tp):
        dev = x2.device.type
        with torch.autocast(dev, enabled=False):
            xf, wf = x2.to(torch.float32), weight.to(torch.float32)
            if mode == "forward_only":
                xq, wq = _bf16(xf), _bf16(wf)
                w_dgrad = None
            else:
                xq = recipe.quant("x_fwd", xf, tp)
                wq = recipe.quant("w_fwd", wf, tp)
                w_dgrad = wq if recipe.reuse_weight_for_dgrad else None
            y = xq @ wq.t()
        ctx.save_for_backward(x2, weight, w_dgrad)
        ctx.recipe, ctx.tp = recipe, tp
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, w_dgrad = ctx.saved_tensors
        recipe, tp = ctx.recipe, ctx.tp
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dyf = dy.to(torch.float32)
            if ctx.needs_input_grad[0]:
                if w_dgrad is None:
                    if recipe.reuse_weight_for_dgrad:
                        w_dgrad = recipe.quant("w_fwd", weight.to(torch.float32), tp)
                    else:
                        w_dgrad = recipe.quant("w_dgrad", weight.to(torch.float32).t().contiguous(), tp).t()
                dx = (recipe.quant("dy_dgrad", dyf, tp) @ w_dgrad).to(x2.dtype)
            if ctx.needs_input_grad[1]:
                a = _pad_last(dyf.t(), recipe.block)
                b = _pad_last(x2.to(torch.float32).t(), recipe.block)
                if recipe.use_rht:
                    a, b = apply_rht(a, recipe.rht), apply_rht(b, recipe.rht)
                dw = (recipe.quant("dy_wgrad", a, tp) @ recipe.quant("x_wgrad", b, tp).t()).to(weight.dtype)
        return dx, dw, None, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, mode: str = "quantized",
                     tp: _Ctx | None = None) -> torch.Tensor:
    """y = x @ weight^T with emulated low-precision GEMMs (x [..., K], weight [N, K], plain tensors)."""
    k = x.shape[-1]
    y = _QuantizedMatmul.apply(x.reshape(-1, k), weight, recipe, mode, tp or _Ctx())
    return y.reshape(*x.shape[:-1], weight.shape[0])


class QuantizedLinear(nn.Linear):
    """nn.Linear whose GEMMs run through a low-precision recipe. Same parameters (master weights) as nn.Linear,
    so checkpoints and tensor-parallel plans are unchanged. `mode`: "quantized", "forward_only" (fprop GEMM inputs
    in BF16, dgrad/wgrad quantized) or "bf16" (plain nn.Linear forward, high precision as the training loop sets)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, recipe: Recipe,
                 mode: str = "quantized"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.mode = mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, mode: str = "quantized") -> "QuantizedLinear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (optimizer state stays valid)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe, new.mode = recipe, mode
        new.train(linear.training)
        # keep hooks already registered (e.g. by parallelize_module when TP was applied first)
        for hook_dict in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                          "_backward_pre_hooks"):
            if hasattr(linear, hook_dict):
                getattr(new, hook_dict).update(getattr(linear, hook_dict))
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, mode={self.mode}"

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bf16":
            return super().forward(x)
        if self.mode not in MODES:
            raise ValueError(f"QuantizedLinear.mode must be one of {MODES}, got {self.mode!r}")
        from torch.distributed.tensor import DTensor

        if isinstance(self.weight, DTensor):
            return self._forward_tp(x)
        if isinstance(x, DTensor):
            raise ValueError("QuantizedLinear: DTensor input with a plain weight is not supported")
        out_dtype = self._out_dtype(x)
        y = quantized_linear(x, self.weight, self.recipe, self.mode)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(out_dtype)

    def _forward_tp(self, x):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        w = self.weight
        mesh = w.device_mesh
        if mesh.ndim != 1 or len(w.placements) != 1:
            raise ValueError("QuantizedLinear: only a 1-D tensor-parallel mesh is supported for the weight")
        placement = w.placements[0]
        group = mesh.get_group()
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if placement.is_shard(0):  # ColwiseParallel: x replicated, y sharded on the last dim, dx partial
            x_local = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            tp = _Ctx(group, row_sharded=frozenset({"w_fwd", "dy_wgrad"}),
                      replicated=frozenset({"x_fwd", "x_wgrad"}))
            out_placement = Shard(x.ndim - 1)
        elif placement.is_shard(1):  # RowwiseParallel: x sharded on the last dim, y partial
            x_local = x.redistribute(mesh, [Shard(x.ndim - 1)]).to_local()
            tp = _Ctx(group, row_sharded=frozenset({"w_dgrad", "x_wgrad"}),
                      replicated=frozenset({"dy_dgrad", "dy_wgrad"}))
            out_placement = Partial()
        else:
            x_local = x.redistribute(mesh, [Replicate()]).to_local()
            tp = _Ctx(None)
            out_placement = Replicate()
        out_dtype = self._out_dtype(x_local)
        y = quantized_linear(x_local, w.to_local(), self.recipe, self.mode, tp)
        if self.bias is not None:
            if placement.is_shard(1):
                raise ValueError("QuantizedLinear: bias with RowwiseParallel is not supported")
            b = self.bias.to_local() if isinstance(self.bias, DTensor) else self.bias
            y = y + b.to(torch.float32)
        return DTensor.from_local(y.to(out_dtype), mesh, [out_placement], run_check=False)
