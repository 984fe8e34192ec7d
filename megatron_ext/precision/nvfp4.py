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

from dataclasses import dataclass

import torch

FP4_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_ENCODE_NUMERATOR = E4M3_MAX * FP4_MAX  # 2688, exact in float32
FP32_MAX = torch.finfo(torch.float32).max

# Magnitudes of the 8 non-negative E2M1 codes; code = sign << 3 | index.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)


def _below(v: float) -> float:
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(0.0)).item()


# Round-to-nearest-even decision points between neighbouring magnitudes. A tie goes to the even index:
# 0.25 -> 0, 0.75 -> 2, 1.25 -> 2, 1.75 -> 4, 2.5 -> 4, 3.5 -> 6, 5.0 -> 6. `bucketize(a, bounds)` counts the bounds
# strictly below `a`, so a bound whose tie rounds UP is moved one float below the midpoint.
_RNE_BOUNDS = (0.25, _below(0.75), 1.25, _below(1.75), 2.5, _below(3.5), 5.0)

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
        grid = _table("e2m1", E2M1_VALUES, self.codes.device)
        vals = grid[self.element_codes().long()]
        s = self.scales.to(torch.float32)
        if tr == 1:
            vals = vals.reshape(m, n // tc, tc) * s.reshape(m, n // tc, 1)
        else:
            vals = vals.reshape(m // tr, tr, n // tc, tc) * s.reshape(m // tr, 1, n // tc, 1)
        return vals.reshape(m, n).to(dtype)

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
    xf = x.detach().to(torch.float32)
    local_amax = tensor_amax(xf)
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
    ax = xf.abs()
    if tr == 1:
        bmax = ax.reshape(m, n // 16, 16).amax(dim=-1)
    else:
        bmax = ax.reshape(m // 16, 16, n // 16, 16).amax(dim=(1, 3))
    scales = torch.clamp(bmax * (g_enc * sixth), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    enc = torch.clamp(torch.reciprocal(scales.to(torch.float32) * g_dec), max=FP32_MAX)
    if tr == 1:
        v = (xf.reshape(m, n // 16, 16) * enc.unsqueeze(-1)).reshape(m, n)
    else:
        v = (xf.reshape(m // 16, 16, n // 16, 16) * enc.reshape(m // 16, 1, n // 16, 1)).reshape(m, n)
    v = torch.clamp(v, -FP4_MAX, FP4_MAX)
    a = v.abs()

    if rounding == "rne":
        idx = torch.bucketize(a, _table("rne_bounds", _RNE_BOUNDS, dev), right=False)
    else:
        mags = _table("e2m1_mag", E2M1_MAGNITUDES, dev)
        lo = torch.bucketize(a, mags, right=True) - 1  # largest grid value <= a
        hi = torch.clamp(lo + 1, max=7)
        lo_v, hi_v = mags[lo], mags[hi]
        width = torch.where(hi > lo, hi_v - lo_v, torch.ones_like(a))
        p_up = (a - lo_v) / width
        u = torch.rand(a.shape, generator=generator, dtype=torch.float32, device=dev)
        idx = lo + (u < p_up).to(lo.dtype)
    codes = idx.to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)
    codes = codes.reshape(m, n // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return NVFP4Tensor(codes=packed, scales=scales, amax=amax.clone(), shape=(m, n), tile=(tr, tc))


def fake_quantize(x: torch.Tensor, tile=(1, 16), rounding="rne", generator=None, global_amax=None,
                  dtype=torch.float32) -> torch.Tensor:
    """quantize + dequantize (the value an NVFP4 GEMM sees), in `dtype`."""
    return quantize(x, tile, rounding, generator, global_amax).dequantize(dtype)
