"""NVFP4 quantizer: FP4 E2M1 values, 16-element blocks with FP8 E4M3 scales, one FP32 scale per tensor.

Bit-identical to TransformerEngine's pure-PyTorch reference formula (see `../shared/reference/nvfp4.md`):

    amax  = max|x|;  g_enc = 2688 / amax (1 if amax == 0, clamped to fp32 max);  g_dec = 1 / g_enc
    s     = e4m3(clamp(bmax * (g_enc * (1/6)), -448, 448))       per 1x16 or 16x16 tile, saturating RNE cast
    enc   = min(1 / (float(s) * g_dec), fp32 max)
    v     = clamp(x * enc, -6, 6)  ->  E2M1 code (RNE with ties to the even code, or stochastic)
    deq   = grid[code] * float(s) * (amax / 2688)

Everything is computed in float32 with torch ops whose rounding is fixed (IEEE mul/div, RNE casts), so the result
does not depend on the machine. `megatron_ext.precision.nvfp4_reference` is an independent scalar implementation
used by the golden tests and the benchmark.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

FP4_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_ENCODE_NUMERATOR = E4M3_MAX * FP4_MAX  # 2688, exact in float32
FP32_MAX = torch.finfo(torch.float32).max

# Magnitudes of the 8 non-negative E2M1 codes; code = sign << 3 | index.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)


_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _table(name: str, values, device, dtype=torch.float32) -> torch.Tensor:
    key = (name, str(device), dtype)
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = _TABLE_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


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
        m, n = self.shape
        tr, tc = self.tile
        # one lookup per packed byte -> (even value, odd value)
        pairs = _table("e2m1_pairs", [[E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]] for b in range(256)],
                       self.codes.device)
        vals = torch.nn.functional.embedding(self.codes.long(), pairs).reshape(m, n // tc, tc)
        s = self.scales.to(torch.float32)
        if tr != 1:  # one scale per 16x16 tile -> per 1x16 row block
            s = s.unsqueeze(1).expand(m // tr, tr, n // tc).reshape(m, n // tc)
        return (vals * s.unsqueeze(-1)).reshape(m, n).to(dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """grid[code] * float(s) * (amax / 2688), in float32, then cast to `dtype`."""
        return (self.dequantize_unscaled(torch.float32) * self._dequant_factor()).to(dtype)

    def _dequant_factor(self) -> torch.Tensor:
        # The formula's factor is amax / (448 * 6); for amax == 0 every scale is 0 so the factor is irrelevant.
        return self.amax / GLOBAL_ENCODE_NUMERATOR


def _check_input(x: torch.Tensor, tile: tuple[int, int]) -> tuple[int, int]:
    if x.ndim != 2:
        raise ValueError(f"nvfp4.quantize: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if tuple(tile) not in ((1, 16), (16, 16)):
        raise ValueError(f"nvfp4.quantize: tile must be (1, 16) or (16, 16), got {tile}")
    m, n = x.shape
    if n % 16 or m % tile[0]:
        raise ValueError(f"nvfp4.quantize: shape {tuple(x.shape)} is not a multiple of the {tile[0]}x{tile[1]} tile")
    return m, n


def _round_e2m1_rne(a: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of |v| on the E2M1 grid, round to nearest, ties to the even index: the number of decision
    points below `a` (strict at ties that round down, non-strict at ties that round up). One uint8 pass per point
    is ~2.5x faster than torch.bucketize on CPU."""
    idx = torch.gt(a, 0.25).view(torch.uint8)
    for point, tie_goes_up in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        idx += (torch.ge(a, point) if tie_goes_up else torch.gt(a, point)).view(torch.uint8)
    return idx


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar; raises on NaN/Inf (a quantized GEMM would silently produce garbage)."""
    amax = x.detach().abs().amax().to(torch.float32) if x.numel() else torch.zeros((), dtype=torch.float32)
    if not torch.isfinite(amax):
        raise ValueError("nvfp4.quantize: input contains NaN or Inf; cannot compute a finite scale "
                         "(check the loss / gradients for overflow)")
    return amax


def quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), rounding: str = "rne",
             generator: torch.Generator | None = None, global_amax: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize a 2-D tensor to NVFP4.

    tile: (1, 16) row blocks or (16, 16) 2-D tiles. rounding: "rne" or "stochastic" (uniform draws from
    `generator`, one float32 per element in row-major order). global_amax: the tensor-wide amax when `x` is a shard
    of a larger tensor (tensor parallel: the caller reduces the local amaxes with MAX across the group), so that
    sharded and unsharded tensors quantize identically.
    """
    m, n = _check_input(x, tile)
    if rounding not in ("rne", "stochastic"):
        raise ValueError(f"nvfp4.quantize: rounding must be 'rne' or 'stochastic', got {rounding!r}")
    xf = x.detach().to(torch.float32).contiguous()
    blocks = xf.reshape(m, n // 16, 16)
    if xf.numel():
        lo_b, hi_b = torch.aminmax(blocks, dim=-1)  # one pass, no |x| temporary
        bmax = torch.maximum(hi_b, -lo_b) + 0.0  # max |x| per 1x16 block (+ 0.0: -0.0 becomes +0.0)
        local_amax = bmax.amax()
    else:
        bmax = blocks.new_zeros((m, n // 16))
        local_amax = torch.zeros((), dtype=torch.float32, device=xf.device)
    if not torch.isfinite(local_amax):
        raise ValueError("nvfp4.quantize: input contains NaN or Inf; cannot compute a finite scale "
                         "(check the loss / gradients for overflow)")
    amax = local_amax if global_amax is None else global_amax.to(torch.float32).reshape(())
    dev = xf.device

    if amax.item() == 0.0:
        g_enc = torch.ones((), dtype=torch.float32, device=dev)
    else:
        g_enc = torch.clamp(torch.tensor(GLOBAL_ENCODE_NUMERATOR, dtype=torch.float32, device=dev) / amax,
                            max=FP32_MAX)
    g_dec = torch.reciprocal(g_enc)
    sixth = torch.tensor(1.0 / 6.0, dtype=torch.float32, device=dev)

    tr, tc = tile
    if tr != 1:  # 16x16 tiles: max over 16 consecutive row blocks
        bmax = bmax.reshape(m // 16, 16, n // 16).amax(dim=1)
    scales = torch.clamp(bmax * (g_enc * sixth), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    enc = torch.clamp(torch.reciprocal(scales.to(torch.float32) * g_dec), max=FP32_MAX)
    if tr != 1:  # one encode factor per row block again
        enc = enc.unsqueeze(1).expand(m // 16, 16, n // 16).reshape(m, n // 16)
    u = None
    if rounding == "stochastic":  # one draw per element, row-major, for the whole tensor (reproducible)
        u = torch.rand((m, n), generator=generator, dtype=torch.float32, device=dev)
    packed = torch.empty((m, n // 2), dtype=torch.uint8, device=dev)
    # the element-wise tail runs on row chunks that stay in cache (~1.5x faster than whole-tensor passes)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        packed[r0:r1] = _encode_rows(blocks[r0:r1], enc[r0:r1], None if u is None else u[r0:r1])
    return NVFP4Tensor(codes=packed, scales=scales, amax=amax.clone(), shape=(m, n), tile=(tr, tc))


_CHUNK_ELEMENTS = 1 << 18


def _encode_rows(blocks: torch.Tensor, enc: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """x blocks [r, n/16, 16] x encode factors [r, n/16] -> packed codes [r, n/2]."""
    r = blocks.shape[0]
    v = (blocks * enc.unsqueeze(-1)).reshape(r, -1)
    v.clamp_(-FP4_MAX, FP4_MAX)
    a = torch.abs(v)
    if u is None:
        idx = _round_e2m1_rne(a)
    else:
        # grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: lo = floor(a / step) * step and
        # p_up = (a - lo) / step are exact in float32 (Sterbenz; power-of-two step), as in the formula
        step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
        lo = torch.floor(a / step).mul_(step)
        p_up = (a - lo).div_(step)
        rounded = torch.where(u < p_up, lo + step, lo)  # on the grid, so the RNE index lookup is exact
        idx = _round_e2m1_rne(rounded)
    idx |= (v < 0).view(torch.uint8) << 3
    # pack pairs: read two codes as one little-endian int16 (b0 + 256 b1) -> b0 | b1 << 4
    if sys.byteorder == "little":
        pairs = idx.view(torch.int16)
        return (pairs | (pairs >> 4)).to(torch.uint8)
    pairs = idx.reshape(r, -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def fake_quantize(x: torch.Tensor, tile=(1, 16), rounding="rne", generator=None, global_amax=None,
                  dtype=torch.float32) -> torch.Tensor:
    """quantize + dequantize (the value an NVFP4 GEMM sees), in `dtype`."""
    return quantize(x, tile, rounding, generator, global_amax).dequantize(dtype)
