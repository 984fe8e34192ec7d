"""Fused NVFP4 linears: the linears of a block that read the same input (Llama: attention wq/wk/wv, MLP w1/w3) run
as ONE autograd Function, as TransformerEngine's fused QKV / fc1 GEMMs do. A single linear is a group of one.

- forward: ONE quantization pass over x (1x16), every member's W (16x16 tiles) and every member's RHT(x^T) (its own
  Hadamard signs; one transform GEMM for all members), then ONE fprop GEMM against the concatenated weights;
- backward: ONE pass over all the members' output gradients (dgrad operand dY = [dy_1 | ... | dy_m] and wgrad
  operands RHT(dy_i^T)), their stochastic-rounding noise hashed in one pass (`rounding.py`'s counters, compared as
  24-bit integers), one dgrad GEMM, the wgrad GEMMs batched when the members have equal sizes.
Saved for backward: packed RNE buckets of every Q(W) and Q(RHT(x^T)) + their E4M3 scales (0.5625 byte / element).

Per-operand amaxes, Hadamard signs and SR keys (layer seed, role, call counter) stay per member, so every quantized
operand is bit-identical to the member's own recipe (`NVFP4Recipe` in `nvfp4_gemm.py`, the formula of `nvfp4.py`).
On CPU (tested) forward outputs and weight gradients are bitwise those of separate linears; on CUDA the GEMM library
may pick another kernel for the concatenated / batched shapes, i.e. another fp32 summation order. dx differs by fp32
summation order (the members' dgrad products are summed inside one GEMM: on CPU, where the exact operands are held
in fp32, the dy operand is pre-scaled by each member's two per-tensor factors; on CUDA one bf16 GEMM per member).

The model stays plain PyTorch (it calls self.wq(x), self.wk(x), self.wv(x)): `fuse_linear_groups` ties the members
of each declared group together. When the group's FIRST member runs, it computes every member's output for its input
and holds the others'; a later member takes its output if it is called with the same input (same storage, offset,
shape, strides and version; grad mode and autocast unchanged) while its weight is unchanged (same storage and
version), else it runs alone. An output never taken gets no gradient (its weight none, as if never called); held
outputs (and the graph behind them) are dropped when taken or when the first member runs again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.precision import nvfp4
from megatron_ext.precision.hadamard import sylvester_hadamard
from megatron_ext.precision.rounding import _signed, col_offsets, noise_counts, row_hashes

F32, BF16 = torch.float32, torch.bfloat16
_CACHE: dict[tuple, object] = {}


def _cached(key, make):
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) > 512:
            _CACHE.clear()
        t = _CACHE[key] = make()
    return t


def _ids(sizes, device) -> torch.Tensor:
    """Segment id of every element of a concatenation of segments of `sizes` (cached)."""
    return nvfp4.segment_ids(tuple(sizes), device)


def _mm(a: torch.Tensor, b: torch.Tensor, op=torch.mm) -> torch.Tensor:
    """a @ b (op: torch.mm or torch.bmm) in fp32 for operands exact in bf16 (bf16 tensor cores with fp32 output on
    CUDA, fp32 on CPU)."""
    if a.is_cuda:
        try:
            return op(a, b, out_dtype=F32)
        except (RuntimeError, TypeError, NotImplementedError):
            return op(a, b).to(F32)
    return op(a, b)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _mm(a, b, torch.bmm)


def _tp_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's data now: two views of one storage with the same geometry and version are equal."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version,
            t.requires_grad)


class _Plan:
    """One call: the members' recipes, the shard context, and the cached per-shape index tensors / sign tables."""

    def __init__(self, recipes, tp, ns, k):
        self.recipes, self.tp, self.ns, self.k, self.m = recipes, tp, tuple(ns), k, len(ns)
        self.cfg = recipes[0].cfg

    def signs(self, device, rows: bool) -> torch.Tensor:
        """Each member's RHT sign vector (T_i = diag(s_i) H / 4, so x @ T_i = (x * s_i) @ (H / 4) exactly):
        [m, 1, 1, 16] for x^T (member-major copies), or [sum N, 1, 16] per row of dY^T."""
        seeds = tuple(r.layer_seed for r in self.recipes)

        def make():
            s = torch.stack([r.rht[:, 0] * 4.0 for r in self.recipes]).to(device)  # H's first column is all ones
            if rows:
                return torch.repeat_interleave(s, torch.tensor(self.ns, device=device), dim=0).view(-1, 1, 16)
            return s.view(self.m, 1, 1, 16)

        return _cached(("signs", seeds, self.ns if rows else None, str(device)), make)

    def wgrad_blocks(self, t: torch.Tensor, rows: bool) -> torch.Tensor:
        """t [rows, T'] (a transposed operand, T' a multiple of 16) -> every member's wgrad operand as 16-blocks
        along T': RHT(t) rounded to bf16 as `NVFP4Recipe._wgrad_operand` does, one member's sign vector each."""
        r, tp_ = t.shape
        if not self.cfg.rht:
            return (t if rows else t.expand(self.m, r, tp_)).reshape(-1, 16)
        t32 = t.to(F32, memory_format=torch.contiguous_format)  # one copy: the blocks run along T' (a view)
        if not t32.is_contiguous():  # already fp32: `to` returned the transposed view itself
            t32 = t32.contiguous()
        if self.m == 1:  # the member's own T: the same GEMM as `NVFP4Recipe._wgrad_operand`
            rec = self.recipes[0]
            h = _cached(("rht", rec.layer_seed, str(t.device)), lambda: rec.rht.to(t.device, F32))
            return (t32.view(-1, 16) @ h).to(BF16)
        blocks = t32.view(r, tp_ // 16, 16) * self.signs(t.device, rows)
        h4 = _cached(("h4", str(t.device)), lambda: (sylvester_hadamard(16) / 4.0).to(t.device))
        return (blocks.view(-1, 16) @ h4).to(BF16)


def _capture(plan, role, i, t, fac):
    rec = plan.recipes[i]
    if rec.capture is not None:
        rec._capture(role, t.to(F32) * fac)


def fused_forward(plan: _Plan, x, ws, need_bwd, out_dtype):
    """x [..., K], ws [N_i, K] -> (the members' outputs [..., N_i] in out_dtype, tensors to save)."""
    k = x.shape[-1]
    m, ns, tp = plan.m, plan.ns, plan.tp
    n_all = sum(ns)
    dev = x.device
    vdt = BF16 if dev.type == "cuda" else F32
    x2 = x.reshape(-1, k)
    t = x2.shape[0]
    tp_pad = t + (-t) % 16
    parts = [x2.reshape(-1, 16)] + [w.reshape(-1, 16) for w in ws]
    if need_bwd:
        parts.append(plan.wgrad_blocks(x2.t() if tp_pad == t else F.pad(x2.t(), (0, tp_pad - t)), rows=False))
    blocks = torch.cat(parts)
    bmax = blocks.abs().amax(dim=-1, keepdim=True)
    nx, nw = t * k // 16, n_all * k // 16
    tiles = bmax[nx:nx + nw].view(n_all // 16, 16, k // 16)  # 16x16 tiles: the tile max for each row block
    tiles.copy_(tiles.amax(dim=1, keepdim=True))
    sizes = (nx,) + tuple(n * k // 16 for n in ns) + ((k * tp_pad // 16,) * m if need_bwd else ())
    amax = tp.reduce_amaxes(nvfp4.segment_amax(bmax, sizes, dev), ["x_fwd"] + ["w_fwd"] * m + ["x_wgrad"] * need_bwd * m)
    scales, sv, bucket = nvfp4.quantize_blocks(blocks, bmax, amax, _ids(sizes, dev), vdt)
    fac = amax.view(-1) / nvfp4.encode_numerator(dev)
    vals = nvfp4.block_values(bucket, sv, rne=True)  # (also of the RHT(x^T) blocks: fewer ops than slicing them off)
    ux, uw = vals.split((nx, nw, vals.shape[0] - nx - nw))[:2]
    ux, uw = ux.view(t, k), uw.view(n_all, k)
    y = _mm(ux, uw.t()).mul_((fac * fac[0])[_ids((0,) + ns, dev)])  # per member: fac_x * fac_w, as unfused
    saved = ()
    if need_bwd:  # packed codes + E4M3 scales of every W (dgrad) and RHT(x^T) (wgrad), their factors
        codes = nvfp4.pack_buckets(bucket[nx:])
        saved = (codes, scales[nx:], fac[1:])
    if any(r.capture is not None for r in plan.recipes):
        _capture_forward(plan, ux, uw, saved, fac, k, tp_pad)
    y = y.to(out_dtype).view(*x.shape[:-1], n_all)
    return (y.split(ns, dim=-1) if m > 1 else (y,)), saved


def _capture_forward(plan, ux, uw, saved, fac, k, tp_pad):
    rows = 0
    for i, n in enumerate(plan.ns):
        _capture(plan, "x_fwd", i, ux, fac[0])
        _capture(plan, "w_fwd", i, uw[rows:rows + n], fac[1 + i])
        rows += n
    if saved:
        u = nvfp4.unpack_buckets(saved[0], saved[1], F32)[uw.numel() // 16:].view(plan.m, k, tp_pad)
        for i in range(plan.m):
            _capture(plan, "x_wgrad", i, u[i], fac[1 + plan.m + i])


def fused_backward(plan: _Plan, dys, saved, x_shape, need_dx):
    """The members' output gradients [..., N_i] (None: never used) -> (dx [x_shape] or None, [dW_i or None])."""
    codes, scales_s, fac_f = saved
    m, ns, k, tp = plan.m, plan.ns, plan.k, plan.tp
    n_all = sum(ns)
    dev = codes.device
    vdt = BF16 if dev.type == "cuda" else F32
    live = [d is not None for d in dys]
    ref = next(d for d in dys if d is not None)
    dys = [d if d is not None else ref.new_zeros(*ref.shape[:-1], n) for d, n in zip(dys, ns)]
    dy = (torch.cat(dys, dim=-1) if m > 1 else dys[0]).reshape(-1, n_all)
    t = dy.shape[0]
    tp_pad = t + (-t) % 16
    wblocks = plan.wgrad_blocks(dy.t() if tp_pad == t else F.pad(dy.t(), (0, tp_pad - t)), rows=True)
    nd = t * n_all // 16 if need_dx else 0
    blocks = torch.cat((dy.reshape(-1, 16), wblocks)) if need_dx else wblocks
    counts = _noise(plan, t, tp_pad, live, need_dx, dev).view(-1, 16) if plan.cfg.stochastic_rounding else None
    bmax = blocks.abs().amax(dim=-1, keepdim=True)
    wsizes = tuple(n * tp_pad // 16 for n in ns)
    if need_dx and m > 1:  # dY's blocks interleave the members along each row
        seg = _cached(("dgrad_ids", ns, t, tp_pad, str(dev)), lambda: torch.cat(
            (_ids(tuple(n // 16 for n in ns), dev).repeat(t), m + _ids(wsizes, dev))))
        seg2 = _cached(("dgrad_ids2", ns, t, tp_pad, str(dev)), lambda: seg.view(-1, 1))
        amax = bmax.new_zeros(2 * m, 1).scatter_reduce_(0, seg2, bmax, "amax")
    else:
        sizes = ((nd,) if need_dx else ()) + wsizes
        amax, seg = nvfp4.segment_amax(bmax, sizes, dev), _ids(sizes, dev)
    amax = tp.reduce_amaxes(amax, ["dy_dgrad"] * need_dx * m + ["dy_wgrad"] * m)
    _, sv, code = nvfp4.quantize_blocks(blocks, bmax, amax, seg, vdt, counts)
    vals = nvfp4.block_values(code, sv, rne=counts is None)
    # per member: fac_dy * fac_w (dgrad), then fac_dy * fac_x (wgrad), as unfused
    f = (amax.view(-1) / nvfp4.encode_numerator(dev)) * (fac_f if need_dx else fac_f[m:])
    batched = m > 1 and len(set(ns)) == 1  # equal members: one batched wgrad GEMM
    fs = f.unbind() if (m == 1 or vdt != F32 or not batched) else None  # per-member scalars where used
    us = nvfp4.unpack_buckets(codes, scales_s, vdt)
    nw = n_all * k // 16
    dx = None
    vals_d, vals_w = vals.split((nd, vals.shape[0] - nd))
    us_w, us_x = us.split((nw, us.shape[0] - nw))
    if need_dx:
        ud, uw = vals_d.view(t, n_all), us_w.view(n_all, k)
        if m == 1:
            dx = _mm(ud, uw).mul_(fs[0])
        elif vdt == F32:  # exact operands in fp32: scale dy's columns, one GEMM
            dx = _mm(ud * f[_ids(ns, dev)], uw)
        else:  # bf16 operands must stay exact: one GEMM per member
            dx, col = None, 0
            for i, n in enumerate(ns):
                part = _mm(ud[:, col:col + n], uw[col:col + n]).mul_(fs[i])
                dx = part if dx is None else dx.add_(part)
                col += n
        dx = dx.view(x_shape)
    if batched:  # per member the same products and sums as its own GEMM
        ua = vals_w.view(m, ns[0], tp_pad)
        dws = _bmm(ua, us_x.view(m, k, tp_pad).transpose(1, 2)).mul_((f[m:] if need_dx else f).view(m, 1, 1))
        dws = [d if live_i else None for d, live_i in zip(dws.unbind(), live)]
    else:
        fw = fs[m:] if need_dx else fs
        ua = vals_w.view(n_all, tp_pad).split(ns) if m > 1 else (vals_w.view(n_all, tp_pad),)
        ub = us_x.view(m, k, tp_pad).unbind() if m > 1 else (us_x.view(k, tp_pad),)
        dws = [_mm(ua[i], ub[i].t()).mul_(fw[i]) if live[i] else None for i in range(m)]
    if any(r.capture is not None for r in plan.recipes):
        fac = amax.view(-1) / nvfp4.encode_numerator(dev)
        col = 0
        for i, n in enumerate(ns):
            if need_dx:
                _capture(plan, "dy_dgrad", i, vals_d.view(t, n_all)[:, col:col + n], fac[i])
            _capture(plan, "dy_wgrad", i, ua[i], fac[(m if need_dx else 0) + i])  # (a view per member)
            col += n
    return dx, dws


def _noise(plan, t, tp_pad, live, need_dx, dev):
    """int 24-bit counts of `rounding.position_hashes` + `uniforms_from_hashes` for every member's dgrad operand
    (laid out as dY [T, sum N]) and wgrad operand ([N_i, T'], member-major), keyed per member and role."""
    tp, ns = plan.tp, plan.ns

    def key(i, role):  # a member whose output got no gradient draws nothing (as unfused: no backward at all)
        return _signed(plan.recipes[i].rounding.next_key(plan.recipes[i].layer_seed, role)) if live[i] else 0

    parts = []
    if need_dx:
        offs = [tp.offsets("dy_dgrad", (t, n)) for n in ns]
        cols = [col_offsets(c0, n, dev) + key(i, "dy_dgrad") for i, ((_, c0), n) in enumerate(zip(offs, ns))]
        parts.append((row_hashes(offs[0][0], t, dev) + (torch.cat(cols) if len(cols) > 1 else cols[0])).view(-1))
    offs = [tp.offsets("dy_wgrad", (n, tp_pad)) for n in ns]
    rows = [row_hashes(r0, n, dev) + key(i, "dy_wgrad") for i, ((r0, _), n) in enumerate(zip(offs, ns))]
    parts.append(((torch.cat(rows) if len(rows) > 1 else rows[0]) + col_offsets(offs[0][1], tp_pad, dev)).view(-1))
    return noise_counts(torch.cat(parts) if len(parts) > 1 else parts[0])


class _FusedNVFP4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, out_dtype, x, *ws):
        need_bwd = any(ctx.needs_input_grad[2:])
        with torch.autocast(x.device.type, enabled=False):
            ys, saved = fused_forward(plan, x, ws, need_bwd, out_dtype)
        ctx.set_materialize_grads(False)  # an output never used gets None, not a zero tensor
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.x_shape, ctx.dtypes = plan, x.shape, (x.dtype, [w.dtype for w in ws])
        return ys

    @staticmethod
    def backward(ctx, *dys):
        if all(d is None for d in dys):
            return (None,) * (3 + ctx.plan.m)
        saved = ctx.saved_tensors  # once: activation checkpointing unpacks each saved tensor once
        with torch.autocast(saved[0].device.type, enabled=False):
            dx, dws = fused_backward(ctx.plan, dys, saved, ctx.x_shape, ctx.needs_input_grad[2])
        x_dtype, w_dtypes = ctx.dtypes
        return (None, None, None if dx is None else dx.to(x_dtype),
                *(None if d is None else d.to(dt) for d, dt in zip(dws, w_dtypes)))


def fusable(mod) -> bool:
    """Whether a QuantizedLinear runs the fused NVFP4 path: quantized mode, the NVFP4 recipe with 2-D weight tiles
    (the forward's Q(W) serves dgrad; without them dgrad re-quantizes W^T: `NVFP4Recipe`)."""
    return fusable_recipe(mod.recipe, mod.mode)


def fusable_recipe(rec, mode: str) -> bool:
    return (mode == "quantized" and getattr(rec, "name", None) == "nvfp4" and rec.cfg.weight_2d
            and getattr(rec, "fused", False))


def linear(x, w, recipe, tp, out_dtype=F32):
    """One linear through the fused path (a group of one): x [..., K], w [N, K] -> [..., N]."""
    return _FusedNVFP4.apply(_Plan([recipe], tp, [w.shape[0]], x.shape[-1]), out_dtype, x, w)[0]


def _local(w):
    from torch.distributed.tensor import DTensor

    if isinstance(w, DTensor):
        return w.to_local(), (w.device_mesh, tuple(w.placements))
    return w, None


def member_forward(mod, x, w, tp, out_dtype):
    """y = x @ w^T (x [..., K], w the member's local weight) through the fused Function, in `out_dtype`: the
    group's held output for this input when there is one, else the whole group (first member) or this one alone."""
    group = mod.__dict__.get("_fusion_group")
    if group is not None:
        y = group.take(mod, x, w)
        if y is not None:
            return y
    members, ws = [mod], [w]
    if group is not None and group.members[0] is mod and x.shape[-1] == mod.in_features:
        placement = _local(mod.weight)[1]
        for other in group.members[1:]:
            lw, pl = _local(other.weight)
            if not (fusable(other) and pl == placement and lw.shape[-1] == w.shape[-1]
                    and lw.requires_grad == w.requires_grad and other.recipe.cfg == mod.recipe.cfg):
                members, ws = [mod], [w]
                break
            members.append(other), ws.append(lw)
    k = x.shape[-1]
    plan = _Plan([m.recipe for m in members], tp, [lw.shape[0] for lw in ws], k)
    ys = _FusedNVFP4.apply(plan, out_dtype, x, *ws)
    if len(members) > 1:
        group.hold(x, members, ws, ys)
    return ys[0]


class LinearGroup:
    """The members of one fused group (QuantizedLinear modules reading the same input) and the outputs the first
    member computed for the others. A plain object (not a module): no parameters, state dict unchanged."""

    def __init__(self, members):
        self.members = list(members)
        self._held = None

    def _state(self, x):
        dev = x.device.type
        return (_tp_key(x), torch.is_grad_enabled(), torch.is_autocast_enabled(dev),
                torch.get_autocast_dtype(dev))

    def hold(self, x, members, ws, ys):
        self._held = (self._state(x), {id(m): (_tp_key(w), y) for m, w, y in zip(members[1:], ws[1:], ys[1:])})

    def take(self, mod, x, w):
        if self._held is None or mod is self.members[0]:
            self._held = None
            return None
        state, outs = self._held
        entry = outs.pop(id(mod), None)
        if not outs:
            self._held = None
        if entry is None or state != self._state(x) or entry[0] != _tp_key(w):
            return None
        return entry[1]

    def __deepcopy__(self, memo):
        import copy

        new = LinearGroup.__new__(LinearGroup)
        memo[id(self)] = new
        new.members = [copy.deepcopy(m, memo) for m in self.members]
        new._held = None
        return new

    def __getstate__(self):
        return {"members": self.members, "_held": None}


def fuse_linear_groups(model, block_names, groups) -> int:
    """Tie together, in every block of `block_names`, the linears of each group in `groups` (tuples of submodule
    names relative to a block, e.g. ("attention.wq", "attention.wk", "attention.wv")) that are all fused-path
    NVFP4 QuantizedLinears without bias. Returns the number of groups formed."""
    from megatron_ext.precision.linear import QuantizedLinear

    formed = 0
    for block_name in block_names:
        block = model.get_submodule(block_name)
        for names in groups:
            try:
                members = [block.get_submodule(n) for n in names]
            except AttributeError:
                continue  # e.g. a mixture-of-experts block has no dense w1 / w3
            if len(members) > 1 and all(isinstance(m, QuantizedLinear) and fusable(m) and m.bias is None
                                        for m in members):
                group = LinearGroup(members)
                for m in members:
                    m.__dict__["_fusion_group"] = group
                formed += 1
    return formed
