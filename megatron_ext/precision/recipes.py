"""The quantized recipes: what each GEMM operand becomes, and how the three GEMMs of a linear layer run.

Each recipe implements `forward(x2, w, tp, mode) -> (y, saved, meta)` and `backward(dy, saved, meta, tp, need_dx,
need_dw) -> (dx, dw)` for the three GEMMs (operands arranged so the reduction dim is the LAST dim):

    fprop  y  = Q(x)[T,K]          @ Q(W)[N,K]^T
    dgrad  dx = Q(dy)[T,N]         @ Q(W^T)[K,N]^T     (NVFP4 2D / FP8 tensorwise: the fprop Q(W) is reused)
    wgrad  dW = Q(RHT(dy^T))[N,T]  @ Q(RHT(x^T))[K,T]^T  (token dim padded with zeros to a block multiple)

- NVFP4 (`nvfp4_gemm.py`): operands of one phase quantized in one batched pass, bf16 GEMMs on exact values, packed
  codes saved for backward.
- FP8 tensorwise / delayed (no Hadamard): E4M3 forward / E5M2 gradients as FP8 codes + one scale each; the wgrad
  reuses the forward's Q(x) and the dgrad's Q(dy) (a per-tensor scale makes Q(x^T) = Q(x)^T); `torch._scaled_mm`
  or its emulation (`gemm.py`); FP8 codes saved for backward.
- FP8 rowwise: power-of-two scale per row of every operand (six quantizations), same GEMM backends.
- Everything else (MXFP8, FP8 with the Hadamard option): the generic emulation below (fake-quantize each operand
  to fp32, fp32 GEMMs; saves the input and the weight Parameter, re-quantizes W in backward).

`recipe.capture = {}` (tests / debugging) keeps the last fake-quantized fp32 operand of each role.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.precision import fp8
from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.precision.gemm import fp8_gemm, use_scaled_mm
from megatron_ext.precision.hadamard import apply_rht, random_signs, rht_matrix
from megatron_ext.precision.rounding import RoundingContext

ROLES = ("x_fwd", "w_fwd", "dy_dgrad", "w_dgrad", "dy_wgrad", "x_wgrad")


class ShardContext:
    """Where the operands live: the TP group (or None), the roles whose rows (not their reduction dim) are sharded,
    the roles replicated on every rank (their amax needs no reduction), and the layer's persistent state."""

    def __init__(self, group=None, row_sharded: frozenset = frozenset(), replicated: frozenset = frozenset(),
                 state: tuple | None = None):
        self.group = group
        self.row_sharded = row_sharded
        self.replicated = replicated
        self.rank = dist.get_rank(group) if group is not None else 0
        self.state = state  # the layer's persistent recipe state (fp8_delayed: amax history, use count)
        self.records_backward = False  # a backward will follow (grad mode on): fp8_delayed keeps forward scales

    def reduce_max(self, t: torch.Tensor, role: str | None = None) -> torch.Tensor:
        if self.group is not None and role not in self.replicated:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def reduce_amaxes(self, amaxes: torch.Tensor, roles) -> torch.Tensor:
        """Per-operand amaxes [k] -> global ones, in one collective (a replicated operand's MAX is itself)."""
        if self.group is None or all(r in self.replicated for r in roles):
            return amaxes
        return self.reduce_max(amaxes)

    def offsets(self, role: str, shape) -> tuple[int, int]:
        """(row, column) of this rank's local operand inside the global (unsharded) operand: sharded rows or
        sharded reduction dim (columns) are split evenly over the TP group in rank order."""
        if self.group is None or role in self.replicated:
            return 0, 0
        if role in self.row_sharded:
            return self.rank * shape[0], 0
        return 0, self.rank * shape[1]


def tensor_amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a float32 scalar on the device: no finiteness check, so no host sync. A NaN/Inf operand gives a
    NaN/Inf amax and a non-finite GEMM output, which the training loop's loss check reports. (The recipes run
    inside an autograd.Function, under no_grad: no detach needed.)"""
    return torch.linalg.vector_norm(t, float("inf"), dtype=torch.float32)


def pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-t.shape[-1]) % multiple
    return F.pad(t, (0, extra)) if extra else t


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


class Recipe:
    """Base recipe: the generic emulation (fake quantization per role, fp32 GEMMs). Subclasses override
    `_quant` (generic) or `forward` / `backward` (specialised paths)."""

    name = "base"
    block = 16  # token-dim padding multiple for wgrad operands
    reuse_weight_for_dgrad = True
    has_state = False  # True: the layer keeps persistent state (module buffers, checkpointed with the model)

    def __init__(self, cfg: PrecisionConfig, layer_seed: int):
        self.cfg = cfg
        self.layer_seed = int(layer_seed)
        self.use_rht = False
        self.rht = rht_matrix(random_signs(layer_seed))
        self.capture: dict | None = None
        self.rounding = RoundingContext()  # (step, micro-batch, dp rank): keys the stochastic rounding noise
        self.dp_group = None  # fp8_delayed: amax histories are MAX-reduced over it (set by set_step_context)

    def new_state(self, device=None) -> tuple:
        return ()

    def _capture(self, role: str, t: torch.Tensor) -> None:
        if self.capture is not None:
            self.capture[role] = t.detach().to(torch.float32).clone()

    def quant(self, role: str, t: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """Fake-quantized (float32) operand of `role`."""
        q = self._quant(role, t, ctx)
        self._capture(role, q)
        return q

    def _quant(self, role: str, t: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        raise NotImplementedError

    # generic emulation ---------------------------------------------------------------------------------------
    def forward(self, x2, w, tp, mode, need_dx=True, need_dw=True):
        xf, wf = x2.to(torch.float32), w.to(torch.float32)
        if mode == "forward_only":
            y = bf16_round(xf) @ bf16_round(wf).t()
        else:
            y = self.quant("x_fwd", xf, tp) @ self.quant("w_fwd", wf, tp).t()
        return y, (x2, w), None

    def backward(self, dy, saved, meta, tp, need_dx, need_dw):
        x2, w = saved
        dyf = dy.to(torch.float32)
        dx = dw = None
        if need_dx:
            if self.reuse_weight_for_dgrad:
                w_dgrad = self.quant("w_fwd", w.to(torch.float32), tp)
            else:
                w_dgrad = self.quant("w_dgrad", w.to(torch.float32).t().contiguous(), tp).t()
            dx = self.quant("dy_dgrad", dyf, tp) @ w_dgrad
        if need_dw:
            a = pad_last(dyf.t(), self.block)
            b = pad_last(x2.to(torch.float32).t(), self.block)
            if self.use_rht:
                a, b = apply_rht(a, self.rht), apply_rht(b, self.rht)
            dw = self.quant("dy_wgrad", a, tp) @ self.quant("x_wgrad", b, tp).t()
        return dx, dw


def _fp8_dtype(role: str, hybrid: bool):
    return fp8.E5M2 if (hybrid and role.startswith("dy")) else fp8.E4M3


class FP8TensorwiseRecipe(Recipe):
    """Current scaling: one scale fmax / amax per operand. Without the Hadamard option: FP8 codes, reused
    transposed for the wgrad, GEMMs by `torch._scaled_mm` or its emulation."""

    name = "fp8_tensorwise"

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _scale_amax(self, role, amax, tp):
        return amax

    def _quant(self, role, t, ctx):  # generic path (Hadamard option)
        amax = self._scale_amax(role, ctx.reduce_max(tensor_amax(t), role), ctx)
        return fp8.tensorwise(t, _fp8_dtype(role, True), amax)

    def _codes(self, role, t, tp):
        """(FP8 codes, inverse scale [1, 1]) of an operand: codes = fp8(t / inv), t ~ codes * inv, inv = amax / fmax.
        The [1, 1] amax (not 0-dim) makes `t / inv` promote a bf16 operand to fp32 without a separate cast."""
        dtype = _fp8_dtype(role, True)
        amax = torch.linalg.vector_norm(t, float("inf"), dim=(0, 1), keepdim=True, dtype=torch.float32)
        amax = self._scale_amax(role, tp.reduce_max(amax, role), tp)
        inv = torch.clamp(amax, min=fp8.AMAX_EPS) / fp8.FP8_MAX[dtype]
        scaled = t / inv
        if self.has_state and dtype == fp8.E5M2:  # a history amax may be below this tensor's: saturate, no inf
            scaled = scaled.clamp_(-fp8.FP8_MAX[dtype], fp8.FP8_MAX[dtype])
        codes = scaled.to(dtype)  # the E4M3 cast saturates by itself
        if self.capture is not None:
            self._capture(role, codes.to(torch.float32) * inv)
        return codes, inv

    def forward(self, x2, w, tp, mode, need_dx=True, need_dw=True):
        if self.use_rht:
            return super().forward(x2, w, tp, mode)
        xq, x_inv = self._codes("x_fwd", x2, tp)
        wq, w_inv = self._codes("w_fwd", w, tp)
        mm = use_scaled_mm(self.cfg.backend, x2.device)
        if mode == "forward_only":
            y = bf16_round(x2.to(torch.float32)) @ bf16_round(w.to(torch.float32)).t()
        else:
            y = fp8_gemm(xq, x_inv, wq, w_inv, mm)
        return y, (xq, x_inv, wq, w_inv), mm

    def backward(self, dy, saved, meta, tp, need_dx, need_dw):
        if self.use_rht:
            return super().backward(dy, saved, meta, tp, need_dx, need_dw)
        xq, x_inv, wq, w_inv = saved
        dyq, dy_inv = self._codes("dy_dgrad", dy, tp)
        if not meta:  # emulation: upcast the gradient codes once for both GEMMs
            dyq = dyq.to(torch.float32)
        dx = fp8_gemm(dyq, dy_inv, wq.t(), w_inv, meta) if need_dx else None
        dw = None
        if need_dw:
            if self.capture is not None:  # the wgrad operands are the transposed forward / dgrad ones
                self.capture["dy_wgrad"] = self.capture["dy_dgrad"].t()
                self.capture["x_wgrad"] = self.capture["x_fwd"].t()
            dw = fp8_gemm(dyq.t(), dy_inv, xq.t(), x_inv, meta)
        return dx, dw


class FP8DelayedRecipe(FP8TensorwiseRecipe):
    """Scale from the max over the last `amax_history_len` amaxes of this operand (current amax on the first use).

    The history and use counts are persistent state: a QuantizedLinear holds them as buffers (`amax_history`
    [roles, len], `amax_count` [roles]), so they are in the model's state_dict and a checkpoint restores them. They
    are updated on the device (no host sync); with a `dp_group` (set_step_context) the amaxes are MAX-reduced over
    data parallel too (as TransformerEngine's amax reduction group), so every rank holds the same history."""

    name = "fp8_delayed"
    has_state = True

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self._own_state: tuple | None = None  # used when called without a module (quantized_linear on tensors)
        # forward scales kept for activation checkpointing's recompute: (step, {role: scale amax}) per forward
        self._forward_scales: collections.deque = collections.deque(maxlen=1024)

    def new_state(self, device=None) -> tuple:
        return (torch.zeros(len(ROLES), self.cfg.amax_history_len, device=device),
                torch.zeros(len(ROLES), dtype=torch.int64, device=device))

    def _replayed_scale(self, role):
        """Activation checkpointing re-runs a block's forward inside backward. That recompute must quantize with the
        scales the original forward used and leave the history alone (else the amax is recorded twice and the
        recomputed activations differ from the ones the loss saw): replay the oldest unreplayed forward of this
        step, in order (every pipeline schedule recomputes micro-batches in their forward order)."""
        while self._forward_scales and self._forward_scales[0][0] != self.rounding.step:
            self._forward_scales.popleft()  # forwards of earlier steps that were never recomputed
        if not self._forward_scales:
            raise RuntimeError(f"fp8_delayed: a forward recomputed in backward has no recorded scale for {role} "
                               "(reentrant activation checkpointing is not supported; use the non-reentrant one)")
        _, scales = self._forward_scales[0]
        scale = scales.pop(role)
        if not scales:
            self._forward_scales.popleft()
        return scale

    def _scale_amax(self, role, amax, ctx):
        forward_role = role in ("x_fwd", "w_fwd")
        if forward_role and torch._C._current_graph_task_id() != -1:  # inside backward: a recompute
            return self._replayed_scale(role)
        amax = amax.reshape(1, 1)
        if ctx.state:
            hist, count = ctx.state
        else:
            if self._own_state is None or self._own_state[0].device != amax.device:
                self._own_state = self.new_state(amax.device)
            hist, count = self._own_state
        i = ROLES.index(role)
        if self.dp_group is not None:
            amax = amax.clone()
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.dp_group)
        c = count[i]
        scale_amax = torch.where(c == 0, amax, hist[i].max())
        hist[i].index_copy_(0, torch.remainder(c, hist.shape[1]).reshape(1), amax.reshape(1))
        count[i:i + 1].add_(1)
        if forward_role and ctx.records_backward:
            if role == "x_fwd" or not self._forward_scales or role in self._forward_scales[-1][1]:
                self._forward_scales.append((self.rounding.step, {}))
            self._forward_scales[-1][1][role] = scale_amax
        return scale_amax

    def state(self) -> dict:
        hist, count = self._own_state or self.new_state()
        return {"history": {r: hist[i].clone() for i, r in enumerate(ROLES)},
                "count": {r: int(count[i]) for i, r in enumerate(ROLES)}}


class FP8RowwiseRecipe(Recipe):
    """One power-of-two scale per row of every operand (E4M3), as torchao's rowwise recipe: six quantizations."""

    name = "fp8_rowwise"
    reuse_weight_for_dgrad = False

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _row_amax(self, role, t, ctx):
        amax_rows = fp8.row_amax(t)
        if role not in ctx.row_sharded:  # rows are whole on every rank only when the reduction dim is sharded
            amax_rows = ctx.reduce_max(amax_rows, role)
        return amax_rows

    def _quant(self, role, t, ctx):  # generic path (Hadamard option)
        return fp8.rowwise(t, fp8.E4M3, self._row_amax(role, t, ctx))

    def _codes(self, role, t, tp):
        scale = fp8.FP8_MAX[fp8.E4M3] / torch.clamp(self._row_amax(role, t, tp), min=fp8.AMAX_EPS)
        scale = torch.exp2(torch.floor(torch.log2(scale)))
        codes = (t.to(torch.float32) * scale).to(fp8.E4M3)
        if self.capture is not None:
            self._capture(role, codes.to(torch.float32) / scale)
        return codes, torch.reciprocal(scale)

    def forward(self, x2, w, tp, mode, need_dx=True, need_dw=True):
        if self.use_rht:
            return super().forward(x2, w, tp, mode)
        mm = use_scaled_mm(self.cfg.backend, x2.device)
        if mode == "forward_only":
            y = bf16_round(x2.to(torch.float32)) @ bf16_round(w.to(torch.float32)).t()
        else:
            y = fp8_gemm(*self._codes("x_fwd", x2, tp), *self._codes("w_fwd", w, tp), mm)
        return y, (x2, w), mm

    def backward(self, dy, saved, meta, tp, need_dx, need_dw):
        if self.use_rht:
            return super().backward(dy, saved, meta, tp, need_dx, need_dw)
        x2, w = saved
        dx = dw = None
        if need_dx:
            dx = fp8_gemm(*self._codes("dy_dgrad", dy, tp), *self._codes("w_dgrad", w.t(), tp), meta)
        if need_dw:
            a = pad_last(dy.t(), self.block)
            b = pad_last(x2.t(), self.block)
            dw = fp8_gemm(*self._codes("dy_wgrad", a, tp), *self._codes("x_wgrad", b, tp), meta)
        return dx, dw


class MXFP8Recipe(Recipe):
    name = "mxfp8"
    block = fp8.MX_BLOCK
    reuse_weight_for_dgrad = False

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.hadamard

    def _quant(self, role, t, ctx):
        return fp8.mxfp8(t, fp8.E4M3)


def recipe_registry() -> dict[str, type]:
    from megatron_ext.precision.nvfp4_gemm import NVFP4Recipe

    return {r.name: r for r in (NVFP4Recipe, FP8TensorwiseRecipe, FP8DelayedRecipe, FP8RowwiseRecipe, MXFP8Recipe)}
