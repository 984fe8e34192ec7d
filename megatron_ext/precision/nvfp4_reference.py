"""Straightforward scalar NVFP4 reference: the formula of `nvfp4.md` written element by element.

Independent of the fast quantizer: it uses numpy float32 scalars (IEEE single-precision arithmetic, one rounding per
operation), its own E4M3 rounding (enumerating the 126 finite non-negative E4M3 values, ties to the even code,
subnormals kept) and its own E2M1 rounding. Slow on purpose; used by the golden tests and as the baseline of
`bench/quantize.py`.
"""

from __future__ import annotations

import bisect

import numpy as np

F32 = np.float32
F32_MAX = F32(np.finfo(np.float32).max)
E2M1_MAGNITUDES = [F32(v) for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]


def _e4m3_value(byte: int) -> float:
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0:
        return man * 2.0 ** -9  # subnormal
    return (1 + man / 8) * 2.0 ** (exp - 7)


E4M3_POSITIVE = [_e4m3_value(b) for b in range(0x7F)]  # 0x7F is NaN; 0x7E = 448 is the max


def e4m3_round(value: np.float32) -> tuple[int, float]:
    """Saturating round-to-nearest-even of a float32 >= 0 onto E4M3; returns (byte, value)."""
    v = float(value)
    if v >= 448.0:
        return 0x7E, 448.0
    i = bisect.bisect_left(E4M3_POSITIVE, v)
    if E4M3_POSITIVE[i] == v:
        return i, v
    lo, hi = i - 1, i
    d_lo, d_hi = v - E4M3_POSITIVE[lo], E4M3_POSITIVE[hi] - v
    pick = lo if d_lo < d_hi else hi if d_hi < d_lo else (lo if lo % 2 == 0 else hi)
    return pick, E4M3_POSITIVE[pick]


def e2m1_round(v: np.float32, u: np.float32 | None = None) -> int:
    """Code of v (|v| <= 6): RNE with ties to the even code, or stochastic with uniform draw `u`."""
    a = F32(abs(v))
    if u is None:
        best = 0
        for k in range(1, 8):
            d_best, d_k = abs(a - E2M1_MAGNITUDES[best]), abs(a - E2M1_MAGNITUDES[k])
            if d_k < d_best or (d_k == d_best and k % 2 == 0):
                best = k
        idx = best
    else:
        lo = max(k for k in range(8) if E2M1_MAGNITUDES[k] <= a)
        if lo == 7:
            idx = 7
        else:
            p_up = F32((a - E2M1_MAGNITUDES[lo]) / F32(E2M1_MAGNITUDES[lo + 1] - E2M1_MAGNITUDES[lo]))
            idx = lo + 1 if F32(u) < p_up else lo
    return idx | (8 if v < 0 else 0)


def quantize_reference(x, tile=(1, 16), uniforms=None):
    """x: 2-D array-like of float32. Returns (codes uint8 [M, N] unpacked, scale bytes uint8 per tile, amax)."""
    x = np.asarray(x, dtype=np.float32)
    m, n = x.shape
    tr, tc = tile
    amax = F32(0.0)
    for val in x.flat:
        amax = max(amax, F32(abs(val)))
    if amax == 0:
        g_enc = F32(1.0)
    else:
        with np.errstate(over="ignore"):
            g_enc = min(F32(F32(2688.0) / amax), F32_MAX)
    g_dec = F32(F32(1.0) / g_enc)
    sixth = F32(1.0 / 6.0)
    codes = np.zeros((m, n), dtype=np.uint8)
    scales = np.zeros((m // tr, n // tc), dtype=np.uint8)
    for bi in range(m // tr):
        for bj in range(n // tc):
            rows, cols = range(bi * tr, (bi + 1) * tr), range(bj * tc, (bj + 1) * tc)
            bmax = F32(0.0)
            for r in rows:
                for c in cols:
                    bmax = max(bmax, F32(abs(x[r, c])))
            s_byte, s_val = e4m3_round(min(F32(bmax * F32(g_enc * sixth)), F32(448.0)))
            scales[bi, bj] = s_byte
            with np.errstate(divide="ignore", over="ignore"):
                enc = min(F32(F32(1.0) / F32(F32(s_val) * g_dec)), F32_MAX)
            for r in rows:
                for c in cols:
                    with np.errstate(over="ignore"):
                        v = F32(x[r, c] * enc)
                    v = F32(min(max(v, F32(-6.0)), F32(6.0)))
                    u = None if uniforms is None else uniforms[r, c]
                    codes[r, c] = e2m1_round(v, u)
    return codes, scales, amax


def dequantize_reference(codes, scale_bytes, amax, tile=(1, 16)) -> np.ndarray:
    m, n = codes.shape
    tr, tc = tile
    out = np.zeros((m, n), dtype=np.float32)
    factor = F32(F32(amax) / F32(2688.0))
    for r in range(m):
        for c in range(n):
            code = int(codes[r, c])
            g = E2M1_MAGNITUDES[code & 7] * (-1 if code & 8 else 1)
            s = F32(E4M3_POSITIVE[int(scale_bytes[r // tr, c // tc])])
            out[r, c] = F32(F32(F32(g) * s) * factor)
    return out
