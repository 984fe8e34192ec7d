"""NVFP4 quantizer: FP4 E2M1 values, 16-element blocks with FP8 E4M3 scales, one FP32 scale per tensor.

Bit-identical to TransformerEngine's pure-PyTorch reference formula (see `../shared/reference/nvfp4.md`):

    amax  = max|x|;  g_enc = 2688 / amax (1 if amax == 0, clamped to fp32 max);  g_dec = 1 / g_enc
    s     = e4m3(clamp(bmax * (g_enc * (1/6)), -448, 448))       per 1x16 or 16x16 tile, saturating RNE cast
    enc   = min(1 / (float(s) * g_dec), fp32 max)
    v     = clamp(x * enc, -6, 6)  ->  E2M1 code (RNE with ties to the even code, or stochastic)
    deq   = grid[code] * float(s) * (amax / 2688)

Everything is computed in float32 with torch ops whose rounding is fixed (IEEE mul/div, RNE casts), so the result
does not depend on the machine. `quantize_many` quantizes several tensors (each with its own amax) in ONE pass of
whole-tensor vectorised ops with no host sync: the training path (`nvfp4_gemm.py`) batches the operands of a GEMM
phase through it, and `quantize` is the same code on one tensor. The golden tests check it against the independent
scalar implementation `nvfp4_reference`.

Shortcuts that leave every output bit unchanged (the golden tests check them): the `amax == 0 -> g_enc = 1` rule
is not needed (2688 / 0 = inf clamps to fp32 max; every block max is then 0, so every scale and code is 0 either
way); the clamps before the E4M3 cast and before the E2M1 rounding are implied (the cast saturates at 448, and the
rounding maps everything above 5 to the code of 6); E2M1 RNE is one `bucketize` of the signed value against the 15
decision points, strict ones moved up by one ulp so ties land on the even code (the training path: fewest ops), or
on CPU in the standalone `quantize` one uint8 comparison pass per decision point over cache-sized row chunks
(branch-free; bucketize's binary search mispredicts there: with the chunks, ~3.5x the throughput).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

import torch

FP4_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_ENCODE_NUMERATOR = E4M3_MAX * FP4_MAX  # 2688, exact in float32
FP32_MAX = torch.finfo(torch.float32).max
CPU_CHUNK_ELEMENTS = 1 << 17  # row chunk of the standalone CPU quantizer (fits L2 with its temporaries)

# Magnitudes of the 8 non-negative E2M1 codes; code = sign << 3 | index.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)


def _f32_next_up(x: float) -> float:
    """The next float32 above x (toward +inf), x a nonzero float32 value."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = bits + 1 if x >= 0 else bits - 1
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# Signed decision points, ascending; bucket i (= number of points <= v) holds E2M1 code _BUCKET_CODE[i].
# |v| ties at 0.25, 1.25, 2.5, 5 round down (to the even code), at 0.75, 1.75, 3.5 up.
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
BUCKET_BOUNDS = tuple([(-p if p in _TIE_DOWN else _f32_next_up(-p)) for p in reversed(_POINTS)] + [0.0]
                      + [(_f32_next_up(p) if p in _TIE_DOWN else p) for p in _POINTS])
BUCKET_CODES = (15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7)

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _table(name: str, values, device, dtype=torch.float32) -> torch.Tensor:
    key = (name, str(device), dtype)
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = _TABLE_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def e2m1_pair_table(device, dtype=torch.float32) -> torch.Tensor:
    """[256, 2]: the (even, odd) E2M1 values of each packed byte."""
    return _table("e2m1_pairs", [[E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]] for b in range(256)], device, dtype)


@dataclass
class NVFP4Tensor:
    """A quantized 2-D tensor. `codes` uint8 [M, N // 2] (low nibble = even column); `scales` float8_e4m3fn
    [M, N // 16] for 1x16 tiles or [M // 16, N // 16] for 16x16 tiles; `amax` float32 scalar (global scale)."""

    codes: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor
    shape: tuple[int, int]
    tile: tuple[int, int]

    def element_codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 [M, N]."""
        low = self.codes & 0x0F
        high = self.codes >> 4
        return torch.stack((low, high), dim=-1).reshape(self.shape)

    def dequantize_unscaled(self, dtype=torch.float32) -> torch.Tensor:
        """grid value x block scale, without the per-tensor factor. Exact in bf16 (<= 6 significant bits)."""
        return unpack_unscaled(self.codes, self.scales, self.shape, self.tile[0], dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """grid[code] * float(s) * (amax / 2688), in float32, then cast to `dtype`."""
        return (self.dequantize_unscaled(torch.float32) * self._dequant_factor()).to(dtype)

    def _dequant_factor(self) -> torch.Tensor:
        # The formula's factor is amax / (448 * 6); for amax == 0 every scale is 0 so the factor is irrelevant.
        return self.amax / GLOBAL_ENCODE_NUMERATOR


def unpack_unscaled(codes: torch.Tensor, scales: torch.Tensor, shape, tile_rows: int = 1,
                    dtype=torch.float32) -> torch.Tensor:
    """Packed codes [M, N/2] + E4M3 scales ([M, N/16], or [M/16, N/16] for 16-row tiles) -> grid x scale [M, N]."""
    m, n = shape
    vals = e2m1_pair_table(codes.device, dtype)[codes.int()].view(m, n // 16, 16)  # one lookup per byte
    s = scales.to(dtype)
    if tile_rows != 1:  # one scale per 16x16 tile -> per 1x16 row block
        s = s.unsqueeze(1).expand(m // tile_rows, tile_rows, n // 16).reshape(m, n // 16)
    return (vals * s.unsqueeze(-1)).view(m, n)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (< 16) [..., 2k] -> [..., k], two per byte, the even-indexed one in the low nibble."""
    if sys.byteorder == "little" and codes.is_contiguous():
        pairs = codes.view(torch.int16)  # b0 + 256 b1; | >> 4 puts b1 << 4 in the low byte, kept by the cast
        return (pairs | (pairs >> 4)).to(torch.uint8)
    pairs = codes.view(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _check_input(x: torch.Tensor, tile: tuple[int, int]) -> tuple[int, int]:
    if x.ndim != 2:
        raise ValueError(f"nvfp4.quantize: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if tuple(tile) not in ((1, 16), (16, 16)):
        raise ValueError(f"nvfp4.quantize: tile must be (1, 16) or (16, 16), got {tile}")
    m, n = x.shape
    if n % 16 or m % tile[0]:
        raise ValueError(f"nvfp4.quantize: shape {tuple(x.shape)} is not a multiple of the {tile[0]}x{tile[1]} tile")
    return m, n


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar; raises on NaN/Inf (a host sync: for the standalone API, not the training path)."""
    if x.numel():  # one pass without an |x| temporary; + 0.0 turns an all-zero -0.0 into +0.0
        lo, hi = torch.aminmax(x.detach())
        amax = (torch.maximum(hi, -lo) + 0.0).to(torch.float32)
    else:
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
    if not torch.isfinite(amax):
        raise ValueError("nvfp4.quantize: input contains NaN or Inf; cannot compute a finite scale "
                         "(check the loss / gradients for overflow)")
    return amax


def _round_e2m1_rne(a: torch.Tensor) -> torch.Tensor:
    """uint8 index (0..7) of |v| on the E2M1 grid, RNE with ties to the even index: the number of decision points
    below `a` (strict where a tie rounds down, non-strict where it rounds up; everything above 5 gives 7, so the
    clamp at 6 is implied; NaN gives 0)."""
    idx = torch.gt(a, 0.25).view(torch.uint8)
    for point, tie_goes_up in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        idx += (torch.ge(a, point) if tie_goes_up else torch.gt(a, point)).view(torch.uint8)
    return idx


@dataclass
class QuantizedBatch:
    """What `quantize_many` returns, per input tensor i: `values[i]` grid x block scale (unscaled; exact in bf16)
    or None, `codes[i]` packed uint8 [M, N/2] or None, `scales[i]` E4M3 per 1x16 row block [M, N/16] (for 16-row
    tiles every row of a tile repeats the tile's scale), `amax[i]` the per-tensor amax (float32 [k])."""

    values: list
    codes: list
    scales: list
    amax: torch.Tensor


_SEGMENT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _segments(sizes: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [k], segment id of each block [sum(sizes)]) on `device`, cached: the same shapes recur every step."""
    key = (sizes, str(device))
    seg = _SEGMENT_CACHE.get(key)
    if seg is None:
        if len(_SEGMENT_CACHE) > 256:
            _SEGMENT_CACHE.clear()
        lengths = torch.tensor(sizes, device=device)
        seg = _SEGMENT_CACHE[key] = (lengths, torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                                        lengths))
    return seg


def quantize_many(mats: list[torch.Tensor], tile_rows: list[int], rounding: str = "rne", amax=None,
                  uniforms: list[torch.Tensor] | None = None, values_dtype=torch.bfloat16,
                  want_values: list[bool] | None = None, want_codes: list[bool] | None = None,
                  rne_by_comparisons: bool = False) -> QuantizedBatch:
    """Quantize k 2-D tensors (last dim a multiple of 16; 16-row tiles: rows a multiple of 16) in one pass.

    amax: None (each tensor's own), a float32 [k] tensor (given: e.g. reduced over a TP group), or a callable
    taking the local [k] amaxes and returning the ones to use. uniforms: per tensor float32 draws for "stochastic".
    No host sync: a NaN/Inf input gives a NaN/Inf amax, NaN scales and values (the caller decides when to look).
    rne_by_comparisons: E2M1 RNE as one branch-free uint8 comparison pass per decision point instead of one
    `bucketize` (a binary search that mispredicts on CPU): ~10 more ops, ~3x faster on CPU (the standalone
    CPU quantizer uses it; the training path keeps the fewest ops). Same bits (golden tests).
    """
    k = len(mats)
    shapes = [tuple(t.shape) for t in mats]
    want_values = want_values or [True] * k
    want_codes = want_codes or [False] * k
    blocks = torch.cat([t.reshape(-1, 16) for t in mats]) if k > 1 else mats[0].reshape(-1, 16)
    dev = blocks.device
    bmax = blocks.abs().amax(dim=-1)  # (abs + amax: 6x faster than vector_norm(inf, dim=-1) on CPU)
    if bmax.dtype != torch.float32:
        bmax = bmax.to(torch.float32)
    sizes = tuple(m * n // 16 for m, n in shapes)
    if any(tr != 1 for tr in tile_rows):
        segments = list(bmax.split(sizes)) if k > 1 else [bmax]
        for i, tr in enumerate(tile_rows):
            if tr != 1:  # 16x16 tiles: the tile max for each of its 16 row blocks (in place in bmax)
                m, n = shapes[i]
                tiles = segments[i].view(m // tr, tr, n // 16).amax(dim=1, keepdim=True)
                segments[i].view(m // tr, tr, n // 16).copy_(tiles.expand(m // tr, tr, n // 16))
    if k > 1:
        lengths, seg = _segments(sizes, dev)
        local_amax = torch.segment_reduce(bmax, "max", lengths=lengths, unsafe=True)  # unsafe: no host check
    else:
        local_amax = bmax.amax(dim=0, keepdim=True)
    if amax is None:
        amax = local_amax
    elif callable(amax):
        amax = amax(local_amax)
    if amax.dtype != torch.float32 or amax.shape != (k,):
        amax = amax.to(torch.float32).reshape(k)
    g_enc = torch.clamp(torch.div(_table("2688", GLOBAL_ENCODE_NUMERATOR, dev), amax), max=FP32_MAX)
    g_scale = g_enc * _table("sixth", 1.0 / 6.0, dev)  # float32(1/6), as in the formula
    g_dec = torch.reciprocal(g_enc)
    if k > 1:
        g_scale, g_dec = g_scale[seg], g_dec[seg]
    scales = (bmax * g_scale).to(torch.float8_e4m3fn)  # saturating RNE cast: the clamp at 448 is implied
    scales_f = scales.to(torch.float32)
    enc = torch.clamp(torch.reciprocal(scales_f * g_dec), max=FP32_MAX)
    v = blocks * enc.unsqueeze(-1)
    if rounding == "rne" and rne_by_comparisons:
        bucket = _round_e2m1_rne(v.abs())
        bucket |= (v < 0).view(torch.uint8) << 3  # = the E2M1 code (uint8): no code lookup needed
        code_table = None
        value_table = _table("code_values", E2M1_VALUES, dev, values_dtype)
    elif rounding == "rne":
        bucket = torch.bucketize(v, _table("bounds", BUCKET_BOUNDS, dev), out_int32=True, right=True)
        code_table = _table("bucket_codes", BUCKET_CODES, dev, torch.uint8)
        value_table = _table("bucket_values", [E2M1_VALUES[c] for c in BUCKET_CODES], dev, values_dtype)
    elif rounding == "stochastic":
        if isinstance(uniforms, torch.Tensor):  # already concatenated, in operand order
            u = uniforms.view(-1, 16)
        else:
            u = torch.cat([t.reshape(-1, 16) for t in uniforms]) if k > 1 else uniforms[0].reshape(-1, 16)
        a = v.abs().clamp_(max=FP4_MAX)
        lo_idx = torch.bucketize(a, _table("grid_up", E2M1_MAGNITUDES[1:], dev), out_int32=True, right=True)
        lo = _table("grid", E2M1_MAGNITUDES, dev)[lo_idx]
        # grid spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: (a - lo) * (1 / step) is exact (as in the formula)
        p_up = (a - lo).mul_(_table("inv_step", (2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5), dev)[lo_idx])
        bucket = lo_idx + (u < p_up) + (v < 0) * 8  # = the E2M1 code
        code_table = _table("codes", range(16), dev, torch.uint8)
        value_table = _table("code_values", E2M1_VALUES, dev, values_dtype)
    else:
        raise ValueError(f"nvfp4.quantize: rounding must be 'rne' or 'stochastic', got {rounding!r}")
    values = codes = None
    if any(want_values):
        s_v = scales_f if values_dtype == torch.float32 else scales.to(values_dtype)
        values = value_table[bucket if code_table is not None else bucket.int()] * s_v.unsqueeze(-1)  # exact in bf16: <= 6 significant bits
        values = list(values.split(sizes)) if k > 1 else [values]
    if any(want_codes):
        codes = pack_codes((code_table[bucket] if code_table is not None else bucket).view(-1, 16))
        codes = list(codes.split(sizes)) if k > 1 else [codes]
    scale_list = (list(scales.split(sizes)) if k > 1 else [scales]) if codes is not None else None
    out = QuantizedBatch([None] * k, [None] * k, [None] * k, amax)
    for i, (m, n) in enumerate(shapes):
        if values is not None and want_values[i]:
            out.values[i] = values[i].view(m, n)
        if codes is not None and want_codes[i]:  # scales are kept with the codes (what a caller stores)
            out.codes[i] = codes[i].view(m, n // 2)
            out.scales[i] = scale_list[i].view(m, n // 16)
    return out


# Fused training path (`fusion.py`): the same formula on blocks already concatenated, per-block quantities [B, 1].

def quantize_blocks(blocks, bmax, amax, seg, values_dtype, counts=None):
    """`quantize_many`'s formula on concatenated 16-blocks [B, 16] with block maxes bmax [B, 1], per-operand
    amaxes [k, 1] and per-block operand ids `seg` [B]: (E4M3 scales [B, 1], scales in `values_dtype`, E2M1 code
    (SR) or RNE bucket [B, 16]). counts: int64 24-bit SR noise [B, 16] (`rounding.noise_counts`)."""
    dev = blocks.device
    g_enc = torch.clamp(torch.div(encode_numerator(dev), amax), max=FP32_MAX)[seg]  # per block, same values
    scales = (bmax * (g_enc * _table("sixth", 1.0 / 6.0, dev))).to(torch.float8_e4m3fn)
    scales_f = scales.to(torch.float32)
    enc = torch.clamp(torch.reciprocal(scales_f * torch.reciprocal(g_enc)), max=FP32_MAX)
    v = blocks * enc
    if counts is None:  # RNE: the bucket of the signed value (BUCKET_CODES maps it to the code)
        code = torch.bucketize(v, _table("bounds", BUCKET_BOUNDS, dev), out_int32=True, right=True)
    else:  # SR: up with probability (a - lo) / step, i.e. when k < (a - lo) / step * 2^24 (exact scalings)
        a = v.abs().clamp_(max=FP4_MAX)
        lo_idx = torch.bucketize(a, _table("grid_up", E2M1_MAGNITUDES[1:], dev), out_int32=True, right=True)
        p = (a - _table("grid", E2M1_MAGNITUDES, dev)[lo_idx]).mul_(
            _table("inv_step_2^24", tuple(s * 2.0 ** 24 for s in (2, 2, 2, 2, 1, 1, 0.5, 0.5)), dev)[lo_idx])
        code = lo_idx + (counts < p) + (v < 0) * 8
    sv = scales_f if values_dtype == torch.float32 else scales.to(values_dtype)
    return scales, sv, code


def block_values(code, sv, rne: bool):
    """grid value x block scale [B, 16] of RNE buckets (rne) or SR codes, in sv's dtype."""
    table = (_table("bucket_values", [E2M1_VALUES[c] for c in BUCKET_CODES], sv.device, sv.dtype)
             if rne else _table("code_values", E2M1_VALUES, sv.device, sv.dtype))
    return table[code] * sv  # exact in bf16: <= 6 significant bits


def encode_numerator(dev):
    """2688 as a float32 [1] tensor: a bf16 amax (exact) divided by it computes in float32 without a cast."""
    return _table("2688[1]", [GLOBAL_ENCODE_NUMERATOR], dev)


def segment_amax(bmax, sizes, dev):
    """Per-operand amax [k, 1] of block maxes [B, 1] laid out as consecutive segments of `sizes` blocks."""
    return torch.segment_reduce(bmax, "max", lengths=_segments(sizes, dev)[0], axis=0, unsafe=True)  # no host check


def segment_ids(sizes, dev) -> torch.Tensor:
    """Operand id of each block [sum(sizes)] (cached)."""
    return _segments(sizes, dev)[1]


def pack_buckets(bucket: torch.Tensor) -> torch.Tensor:
    """RNE buckets (int32 [B, 16], < 16) -> two per byte [B, 8], the even one in the low nibble (what backward
    unpacks with the bucket-pair value table; a bucket names its code: BUCKET_CODES)."""
    if sys.byteorder == "little":
        pairs = bucket.view(torch.int64)  # b0 + 2^32 b1: >> 28 puts b1 << 4 in the low byte, kept by the cast
        return (pairs | (pairs >> 28)).to(torch.uint8)
    pairs = bucket.view(-1, 8, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_buckets(codes, scales, dtype):
    """Packed RNE buckets + E4M3 scales [B, 1] -> grid value x scale [B, 16] (exact in bf16)."""
    dev = codes.device
    table = _table("bucket_pairs", [[E2M1_VALUES[BUCKET_CODES[b & 15]], E2M1_VALUES[BUCKET_CODES[b >> 4]]]
                                    for b in range(256)], dev, dtype)
    return table[codes.int()].view(-1, 16) * scales.to(dtype)


def quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), rounding: str = "rne",
             generator: torch.Generator | None = None, global_amax: torch.Tensor | None = None, *,
             uniforms: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize a 2-D tensor to NVFP4.

    tile: (1, 16) row blocks or (16, 16) 2-D tiles. rounding: "rne" or "stochastic" (uniform draws from
    `generator`, one float32 per element in row-major order). global_amax: the tensor-wide amax when `x` is a shard
    of a larger tensor (tensor parallel: the caller reduces the local amaxes with MAX across the group), so that
    sharded and unsharded tensors quantize identically. uniforms: float32 [M, N] draws for stochastic rounding
    instead of `generator` (the training path passes counter-based draws, `rounding.counter_uniforms`).
    Raises ValueError on NaN/Inf input (one host sync; the training path uses `quantize_many` directly).
    """
    m, n = _check_input(x, tile)
    if rounding not in ("rne", "stochastic"):
        raise ValueError(f"nvfp4.quantize: rounding must be 'rne' or 'stochastic', got {rounding!r}")
    xf = x.detach()
    if xf.dtype not in (torch.float32, torch.bfloat16):
        xf = xf.to(torch.float32)
    local = tensor_amax(xf)
    amax = (local if global_amax is None else global_amax.to(torch.float32)).reshape(1)
    if not xf.numel():
        empty = torch.empty((m, n // 2), dtype=torch.uint8, device=xf.device)
        return NVFP4Tensor(empty, torch.empty((m // tile[0], n // 16), dtype=torch.float8_e4m3fn,
                                              device=xf.device), amax.reshape(()).clone(), (m, n), tuple(tile))
    if rounding == "stochastic" and uniforms is None:  # one draw per element, row-major (reproducible)
        uniforms = torch.rand((m, n), generator=generator, dtype=torch.float32, device=xf.device)
    # On CPU the element-wise passes are memory-bound: run them on row chunks that stay in cache (every block is
    # independent once the tensor amax is known, so the output is the same bits); on a GPU one pass is best.
    step = m if xf.device.type != "cpu" else max(tile[0], (CPU_CHUNK_ELEMENTS // n) // tile[0] * tile[0])
    codes, scales = [], []
    for r0 in range(0, m, step):
        u = None if uniforms is None else uniforms[r0:r0 + step]
        q = quantize_many([xf[r0:r0 + step]], [tile[0]], rounding, amax=amax, uniforms=[u], want_values=[False],
                          want_codes=[True], rne_by_comparisons=xf.device.type == "cpu")
        codes.append(q.codes[0])
        scales.append(q.scales[0] if tile[0] == 1 else q.scales[0][::tile[0]])
    codes = codes[0] if len(codes) == 1 else torch.cat(codes)
    scales = scales[0].contiguous() if len(scales) == 1 else torch.cat(scales)
    return NVFP4Tensor(codes=codes, scales=scales, amax=amax.reshape(()).clone(), shape=(m, n), tile=tuple(tile))


def fake_quantize(x: torch.Tensor, tile=(1, 16), rounding="rne", generator=None, global_amax=None,
                  dtype=torch.float32, *, uniforms=None) -> torch.Tensor:
    """quantize + dequantize (the value an NVFP4 GEMM sees), in `dtype`."""
    return quantize(x, tile, rounding, generator, global_amax, uniforms=uniforms).dequantize(dtype)
