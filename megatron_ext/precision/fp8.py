"""FP8 fake quantizers (quantize then dequantize to float32): the values an FP8 GEMM sees.

All operate along the LAST dimension of a 2-D tensor, which the caller arranges to be the GEMM reduction dimension.
- tensorwise: one scale fmax / amax per tensor (current scaling), or a scale from an amax history (delayed scaling).
- rowwise: one power-of-two scale per row.
- MXFP8: 32-element blocks, E8M0 (power-of-two) scales = 2^(floor(log2 bmax) - emax_elem), E4M3 elements. The
  exponent is taken with frexp (exact floor), not with torch's E8M0 cast (which rounds to the nearest power of two).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
FP8_EMAX = {E4M3: 8, E5M2: 15}  # exponent of the largest normal: 448 = 1.75 * 2^8, 57344 = 1.75 * 2^15
AMAX_EPS = 1e-12
MX_BLOCK = 32


def _cast(x_scaled: torch.Tensor, dtype) -> torch.Tensor:
    fmax = FP8_MAX[dtype]
    return torch.clamp(x_scaled, -fmax, fmax).to(dtype).to(torch.float32)


def tensorwise(x: torch.Tensor, dtype=E4M3, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor current scaling: scale = fmax / amax (amax of this tensor, or the one given: global / delayed)."""
    xf = x.to(torch.float32)
    if amax is None:
        amax = xf.abs().amax()
    scale = FP8_MAX[dtype] / torch.clamp(amax.to(torch.float32), min=AMAX_EPS)
    return _cast(xf * scale, dtype) / scale


def row_amax(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).abs().amax(dim=-1, keepdim=True)


def rowwise(x: torch.Tensor, dtype=E4M3, amax_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scaling with power-of-two scales (floor(log2(fmax / amax_row)), as torchao's rowwise recipe)."""
    xf = x.to(torch.float32)
    if amax_rows is None:
        amax_rows = row_amax(xf)
    scale = FP8_MAX[dtype] / torch.clamp(amax_rows, min=AMAX_EPS)
    scale = torch.exp2(torch.floor(torch.log2(scale)))
    return _cast(xf * scale, dtype) / scale


def mx_block_exponents(x: torch.Tensor, dtype=E4M3, block: int = MX_BLOCK) -> torch.Tensor:
    """E8M0 shared exponents (int32 in [-127, 127]) per `block` elements along the last dim."""
    m, n = x.shape
    bmax = x.to(torch.float32).abs().reshape(m, n // block, block).amax(dim=-1)
    _, e = torch.frexp(bmax)  # bmax = f * 2^e with f in [0.5, 1): floor(log2 bmax) = e - 1
    shared = (e - 1) - FP8_EMAX[dtype]
    shared = torch.where(bmax > 0, shared, torch.zeros_like(shared))
    return torch.clamp(shared, -127, 127)


def mxfp8(x: torch.Tensor, dtype=E4M3, block: int = MX_BLOCK) -> torch.Tensor:
    m, n = x.shape
    if n % block:
        raise ValueError(f"mxfp8: last dimension {n} is not a multiple of {block}")
    scale = torch.exp2(mx_block_exponents(x, dtype, block).to(torch.float32)).unsqueeze(-1)
    xf = x.to(torch.float32).reshape(m, n // block, block)
    return (_cast(xf / scale, dtype) * scale).reshape(m, n)
