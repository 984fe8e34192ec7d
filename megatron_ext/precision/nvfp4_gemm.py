"""The NVFP4 recipe's GEMMs: batched quantization, bf16 GEMMs on exact operands, packed codes saved for backward.

Per linear layer and micro-batch:
- forward: ONE `quantize_many` pass over x (1x16, RNE), W (16x16 tiles, RNE) and RHT(x^T) (1x16 along tokens, RNE;
  quantized now so backward needs no activation copy), with one TP amax all-reduce for the three; the fprop GEMM
  runs in bf16 on grid x block-scale values (exact in bf16) and the per-tensor factors amax_x/2688 * amax_w/2688
  scale the fp32 output. Saved for backward: Q(W) and Q(RHT(x^T)) as packed FP4 codes (0.5 byte / element) + E4M3
  scales (1/16 byte) + the amaxes: 0.5625 bytes per element where a bf16 layer saves x and W in 2 bytes.
- backward: ONE `quantize_many` pass over dy (1x16) and RHT(dy^T) (1x16 along tokens), stochastic rounding from
  counter-based noise (`rounding.py`) keyed by the elements' global positions; dgrad and wgrad in bf16 the same way.

The training path (QuantizedLinear / quantized_linear in quantized mode with 2-D weight tiles) runs the same
operands and GEMMs through `fusion.py` (fewer ops per call; linears reading the same input fused into one
Function); `NVFP4Recipe.forward` / `backward` serve the other modes (forward_only, 1x16 weights) and are the
per-linear oracle the fused path is tested against bit for bit.

Against the fp32 emulation (fake-quantized fp32 operands, fp32 GEMM) the operands are bit-identical and each output
element differs only by fp32 rounding: |bf16 path - emulation| <= 2 K 2^-24 (|A| @ |B|^T) elementwise, K the reduction
length (both accumulate exact products in fp32; the emulation also rounds each operand element when it applies the
per-tensor factor). `tests/test_precision_linear.py` checks that bound.
"""

from __future__ import annotations

import torch

from megatron_ext.precision import nvfp4
from megatron_ext.precision.gemm import exact_bf16_gemm
from megatron_ext.precision.recipes import Recipe, pad_last
from megatron_ext.precision.rounding import position_hashes, uniforms_from_hashes

BF16 = torch.bfloat16


def _values_dtype(t: torch.Tensor) -> torch.dtype:
    """bf16 operands for the GPU GEMM; on CPU (no bf16 -> fp32 mm) the same exact values held in fp32 save casts."""
    return BF16 if t.device.type == "cuda" else torch.float32


class NVFP4Recipe(Recipe):
    name = "nvfp4"
    fused = True  # 2-D weight tiles, quantized mode: QuantizedLinear / quantized_linear run `fusion.py`'s path

    def __init__(self, cfg, layer_seed):
        super().__init__(cfg, layer_seed)
        self.use_rht = cfg.rht
        self.reuse_weight_for_dgrad = cfg.weight_2d
        self._rht_on: dict[str, torch.Tensor] = {}

    def _wgrad_operand(self, t2: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [C, T'] along tokens (zero-padded to 16), through the RHT when enabled: one matmul of all
        16-blocks by T, rounded to bf16 (TE's order: the transform runs in bf16 before the amax)."""
        a = pad_last(t2.t(), 16)
        if not self.use_rht:
            return a
        key = str(a.device)
        t = self._rht_on.get(key)
        if t is None:
            t = self._rht_on[key] = self.rht.to(a.device, torch.float32)
        # one copy: a cast writes the transposed operand row-major (the reshape to blocks is then a view)
        a32 = a.to(torch.float32, memory_format=torch.contiguous_format)
        return (a32.reshape(-1, 16) @ t).to(BF16).view(a.shape)

    def _amax_fn(self, tp, roles):
        return lambda local: tp.reduce_amaxes(local, roles)

    def _capture_values(self, roles, q, fac):
        if self.capture is None:
            return
        for i, role in enumerate(roles):
            u = q.values[i]
            if u is None:  # codes only: unpack (debugging path)
                u = nvfp4.unpack_unscaled(q.codes[i], q.scales[i], (q.scales[i].shape[0], q.codes[i].shape[1] * 2))
            self._capture(role, u.to(torch.float32) * fac[i])

    def forward(self, x2, w, tp, mode, need_dx=True, need_dw=True):
        quantized = mode != "forward_only"
        two_d = self.cfg.weight_2d
        mats, tiles, roles, want_v, want_c = [], [], [], [], []

        def add(t, tile, role, values, codes):
            mats.append(t), tiles.append(tile), roles.append(role), want_v.append(values), want_c.append(codes)
            return len(mats) - 1

        ix = add(x2, 1, "x_fwd", True, False) if quantized else None
        iw = add(w, 16 if two_d else 1, "w_fwd", quantized, need_dx and two_d) if quantized or two_d else None
        ixt = add(self._wgrad_operand(x2), 1, "x_wgrad", False, True) if need_dw else None
        saved, fac = [None] * 4, None
        if mats:
            q = nvfp4.quantize_many(mats, tiles, "rne", amax=self._amax_fn(tp, roles), want_values=want_v,
                                    want_codes=want_c, values_dtype=_values_dtype(x2))
            fac = q.amax / nvfp4.GLOBAL_ENCODE_NUMERATOR
            self._capture_values(roles, q, fac)
            if iw is not None and want_c[iw]:
                saved[0:2] = q.codes[iw], q.scales[iw]
            if ixt is not None:
                saved[2:4] = q.codes[ixt], q.scales[ixt]
        if quantized:
            y = exact_bf16_gemm(q.values[ix], q.values[iw]).mul_(fac[ix] * fac[iw])
        else:  # forward-only switch: the fprop GEMM in bf16
            vd = _values_dtype(x2)
            y = exact_bf16_gemm(x2.to(BF16).to(vd), w.to(BF16).to(vd))
        w_keep = None if (two_d or not need_dx) else w  # 1x16 weights: dgrad quantizes W^T in backward
        meta = (x2.shape[0], w.shape, iw, ixt)
        return y, (*saved, fac, w_keep), meta

    def backward(self, dy, saved, meta, tp, need_dx, need_dw):
        w_codes, w_scales, xt_codes, xt_scales, fac_fwd, w_keep = saved
        n_tokens, (n, k), iw, ixt = meta
        mats, roles = [], []
        if need_dx:
            mats.append(dy), roles.append("dy_dgrad")
        if need_dw:
            mats.append(self._wgrad_operand(dy)), roles.append("dy_wgrad")
        stochastic = self.cfg.stochastic_rounding
        uniforms = None
        if stochastic:  # counter-based draws keyed by the elements' global positions: no state, TP-invariant
            hashes = torch.empty(sum(t.numel() for t in mats), dtype=torch.int64, device=dy.device)
            start = 0
            for t, role in zip(mats, roles):
                position_hashes(self.rounding.next_key(self.layer_seed, role), t.shape[0], t.shape[1],
                                *tp.offsets(role, t.shape), device=t.device,
                                out=hashes[start:start + t.numel()].view(t.shape))
                start += t.numel()
            uniforms = uniforms_from_hashes(hashes)  # one mix pass over both operands' counters
        q = nvfp4.quantize_many(mats, [1] * len(mats), "stochastic" if stochastic else "rne",
                                amax=self._amax_fn(tp, roles), uniforms=uniforms, values_dtype=_values_dtype(dy))
        fac = q.amax / nvfp4.GLOBAL_ENCODE_NUMERATOR
        self._capture_values(roles, q, fac)
        dx = dw = None
        if need_dx:
            if w_keep is None:  # the forward's 16x16-tile Q(W), reused
                u_w = nvfp4.unpack_unscaled(w_codes, w_scales, (n, k), 1, _values_dtype(dy))
                dx = exact_bf16_gemm(q.values[0], u_w.t()).mul_(fac[0] * fac_fwd[iw])
            else:
                qw = nvfp4.quantize_many([w_keep.t()], [1], "rne", amax=self._amax_fn(tp, ["w_dgrad"]),
                                         values_dtype=_values_dtype(dy))
                fw = qw.amax / nvfp4.GLOBAL_ENCODE_NUMERATOR
                self._capture_values(["w_dgrad"], qw, fw)
                dx = exact_bf16_gemm(q.values[0], qw.values[0]).mul_(fac[0] * fw[0])
        if need_dw:
            u_xt = nvfp4.unpack_unscaled(xt_codes, xt_scales, (k, xt_codes.shape[1] * 2), 1, _values_dtype(dy))
            dw = exact_bf16_gemm(q.values[-1], u_xt).mul_(fac[-1] * fac_fwd[ixt])
        return dx, dw
