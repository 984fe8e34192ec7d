"""Quantized linear layer: NVFP4 / FP8 GEMMs for fprop, dgrad and wgrad (the recipes: `recipes.py`).

Tensor parallel: when the weight is a DTensor (ColwiseParallel / RowwiseParallel, with or without sequence
parallel), the layer computes on local shards and reduces each operand's amax with MAX over the TP group, so a
sharded layer quantizes exactly as the unsharded one would, stochastic rounding included: its noise is a function of
(seed, layer, role, step, micro-batch, DP rank, the element's global position) (`rounding.py`).

NVFP4 (quantized mode, 2-D weight tiles) runs through `fusion.py`: one Function per linear, or per group of linears
that read the same input when `apply_precision(..., linear_groups=...)` declared them (Llama: q/k/v, w1/w3).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron_ext.precision import fusion
from megatron_ext.precision.recipes import ROLES, Recipe, ShardContext, recipe_registry

F32 = torch.float32

MODES = ("quantized", "forward_only", "bf16")
RECIPES = recipe_registry()
__all__ = ["MODES", "RECIPES", "ROLES", "QuantizedLinear", "quantized_linear"]


class _QuantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, recipe, mode, tp):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(x2.device.type, enabled=False):
            y, saved, meta = recipe.forward(x2, weight, tp, mode, need_dx, need_dw)
        ctx.save_for_backward(*saved)
        ctx.recipe, ctx.tp, ctx.meta = recipe, tp, meta
        ctx.x_dtype, ctx.w_dtype = x2.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            dx, dw = ctx.recipe.backward(dy, ctx.saved_tensors, ctx.meta, ctx.tp, ctx.needs_input_grad[0],
                                         ctx.needs_input_grad[1])
        return (None if dx is None else dx.to(ctx.x_dtype), None if dw is None else dw.to(ctx.w_dtype),
                None, None, None)


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, mode: str = "quantized",
                     tp: ShardContext | None = None, state: tuple | None = None) -> torch.Tensor:
    """y = x @ weight^T with low-precision GEMMs (x [..., K], weight [N, K], plain tensors), fp32 output. `state`:
    the layer's persistent recipe state (QuantizedLinear passes its buffers)."""
    k = x.shape[-1]
    tp = tp or ShardContext()
    tp.state = state
    tp.records_backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if fusion.fusable_recipe(recipe, mode):  # NVFP4 2D: the fused path as a group of one (fusion.py)
        return fusion.linear(x, weight, recipe, tp)
    y = _QuantizedMatmul.apply(x.reshape(-1, k), weight, recipe, mode, tp)
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
        self._register_recipe_state()

    STATE_BUFFERS = ("amax_history", "amax_count")

    def _register_recipe_state(self) -> None:
        """Persistent recipe state (fp8_delayed's amax history) as buffers: in the state_dict, so DCP checkpoints
        it and a resume restores it; created on the weight's device (meta under deferred init: `init_buffers`)."""
        if self.recipe.has_state:
            for name, t in zip(self.STATE_BUFFERS, self.recipe.new_state(self.weight.device)):
                self.register_buffer(name, t, persistent=True)

    def init_buffers(self) -> None:
        """Fresh recipe state after `to_empty` (the parallel engine calls it after materializing the model)."""
        if self.recipe.has_state:
            with torch.no_grad():
                for name in self.STATE_BUFFERS:
                    getattr(self, name).zero_()

    def _recipe_state(self) -> tuple | None:
        return tuple(getattr(self, n) for n in self.STATE_BUFFERS) if self.recipe.has_state else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, mode: str = "quantized") -> "QuantizedLinear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (optimizer state stays valid)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe, new.mode = recipe, mode
        new._register_recipe_state()
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
        if fusion.fusable(self):  # NVFP4: one Function per input for the linears of a group (fusion.py)
            y = fusion.member_forward(self, x, self.weight, ShardContext(), out_dtype if self.bias is None else F32)
        else:
            y = quantized_linear(x, self.weight, self.recipe, self.mode, state=self._recipe_state())
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
            tp = ShardContext(group, row_sharded=frozenset({"w_fwd", "dy_wgrad"}),
                      replicated=frozenset({"x_fwd", "x_wgrad"}))
            out_placement = Shard(x.ndim - 1)
        elif placement.is_shard(1):  # RowwiseParallel: x sharded on the last dim, y partial
            x_local = x.redistribute(mesh, [Shard(x.ndim - 1)]).to_local()
            tp = ShardContext(group, row_sharded=frozenset({"w_dgrad", "x_wgrad"}),
                      replicated=frozenset({"dy_dgrad", "dy_wgrad"}))
            out_placement = Partial()
        else:
            x_local = x.redistribute(mesh, [Replicate()]).to_local()
            tp = ShardContext(None)
            out_placement = Replicate()
        out_dtype = self._out_dtype(x_local)
        if fusion.fusable(self):
            y = fusion.member_forward(self, x_local, w.to_local(), tp, out_dtype if self.bias is None else F32)
        else:
            y = quantized_linear(x_local, w.to_local(), self.recipe, self.mode, tp, state=self._recipe_state())
        if self.bias is not None:
            if placement.is_shard(1):
                raise ValueError("QuantizedLinear: bias with RowwiseParallel is not supported")
            b = self.bias.to_local() if isinstance(self.bias, DTensor) else self.bias
            y = y + b.to(torch.float32)
        return DTensor.from_local(y.to(out_dtype), mesh, [out_placement], run_check=False)
