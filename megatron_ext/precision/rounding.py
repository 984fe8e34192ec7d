"""Stochastic-rounding noise from a counter-based generator, and the per-step context that keys it.

Every draw is a pure function of (run seed, layer, operand role, step, micro-batch, data-parallel rank, call index
within the micro-batch, the element's GLOBAL row and column): nothing is stateful, so

- a tensor-parallel shard draws exactly the numbers the unsharded tensor would draw at the same positions (TP2
  quantizes like TP1 with SR on);
- data-parallel ranks and micro-batches draw independent noise;
- a resumed run draws what the uninterrupted run drew: there is no generator state to checkpoint.

The hash is SplitMix64's finalizer (Steele, Lea, Flood 2014) in vectorised int64 torch ops: each global row gets a
mixed 64-bit stream start (cached: key-independent), the key and a Weyl step along the columns are added, and every
element is mixed once more; its low 24 bits give a float32 uniform in [0, 1) (the resolution of torch.rand). No
Python loop, no host sync, the same numbers on every device.

The trainer calls, for every model part, once per micro-batch before its forward (or once per optimizer step with
micro_batch=0; calls within a step are counted per layer, so both give reproducible draws):

    set_step_context(model_part, step=step, micro_batch=micro, dp_rank=engine.dp_rank)
"""

from __future__ import annotations

import torch
import torch.nn as nn

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 torch multiplies with (two's complement wrap-around)."""
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def mix64(v: int) -> int:
    """SplitMix64 finalizer on a Python int (host side, for keys)."""
    v &= MASK64
    v = ((v ^ (v >> 30)) * _M1) & MASK64
    v = ((v ^ (v >> 27)) * _M2) & MASK64
    return v ^ (v >> 31)


def combine_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, layer, role, step, ...): chained SplitMix64."""
    h = 0
    for p in parts:
        h = mix64(h ^ ((int(p) * GOLDEN) & MASK64))
    return h


def _mix64_(h: torch.Tensor, last_mask: bool = True) -> torch.Tensor:
    """SplitMix64 finalizer on an int64 tensor, in place. `>>` is arithmetic on int64: mask to a logical shift
    (the last mask only changes the top 31 bits, which callers reading the low bits can skip)."""
    h ^= (h >> 30) & ((1 << 34) - 1)
    h *= _signed(_M1)
    h ^= (h >> 27) & ((1 << 37) - 1)
    h *= _signed(_M2)
    h ^= ((h >> 31) & ((1 << 33) - 1)) if last_mask else (h >> 31)
    return h


_POSITION_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(kind: str, start: int, n: int, device) -> torch.Tensor:
    """Key-independent per-row hashes / per-column Weyl offsets, cached (the same shapes recur every step)."""
    key = (kind, start, n, str(device))
    t = _POSITION_CACHE.get(key)
    if t is None:
        if len(_POSITION_CACHE) > 1024:
            _POSITION_CACHE.clear()
        idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
        t = _mix64_(idx.mul_(_signed(GOLDEN))) if kind == "row" else idx.mul_(_signed(_M2 | 1))
        _POSITION_CACHE[key] = t
    return t


def position_hashes(key: int, rows: int, cols: int, row0: int = 0, col0: int = 0,
                    device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [rows, cols] pre-mix counters of the global positions [row0:row0+rows, col0:col0+cols] under `key`:
    mix(row) + col * odd + key (a random stream start per row, a Weyl sequence along it). `out`: written in place
    (a slice of one buffer for several operands, mixed in one pass without a concatenation copy)."""
    col_term = _cached("col", col0, cols, device) + _signed(key)
    return torch.add(_cached("row", row0, rows, device).unsqueeze(1), col_term, out=out)


def row_hashes(row0: int, rows: int, device) -> torch.Tensor:
    """int64 [rows, 1]: the mixed stream starts of global rows row0.. (cached; `position_hashes`' row term)."""
    key = ("row2", row0, rows, str(device))
    t = _POSITION_CACHE.get(key)
    if t is None:  # cached as a column too: no per-call view
        t = _POSITION_CACHE[key] = _cached("row", row0, rows, device).unsqueeze(1)
    return t


def col_offsets(col0: int, cols: int, device) -> torch.Tensor:
    """int64 [cols]: the Weyl offsets of global columns col0.. (cached; `position_hashes`' column term)."""
    return _cached("col", col0, cols, device)


def noise_counts(h: torch.Tensor) -> torch.Tensor:
    """Mix pre-mix counters (in place) and keep the low 24 bits: int64 counts k, the uniform being k * 2^-24
    (`uniforms_from_hashes` without the conversion: `k < p * 2^24` decides exactly as `u < p`)."""
    return _mix64_(h, last_mask=False).bitwise_and_(0xFFFFFF)


def uniforms_from_hashes(h: torch.Tensor) -> torch.Tensor:
    """Mix pre-mix counters (in place) and map the low 24 bits to float32 uniforms in [0, 1)."""
    return noise_counts(h).to(torch.float32).mul_(2.0 ** -24)


def counter_uniforms(key: int, rows: int, cols: int, row0: int = 0, col0: int = 0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [rows, cols] uniforms in [0, 1) for the global positions [row0:row0+rows, col0:col0+cols] of a
    tensor, keyed by `key` (a 64-bit int from `combine_key`)."""
    return uniforms_from_hashes(position_hashes(key, rows, cols, row0, col0, device))


class RoundingContext:
    """Where a layer is in training: set by `set_step_context`, read by the recipes when they draw SR noise.

    `calls` counts the draws of each operand role since the context was last set, so several uses of a layer in one
    micro-batch (or several micro-batches under one context) still get independent noise, deterministically."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_batch = 0
        self.dp_rank = 0
        self.calls: dict[str, int] = {}

    def set(self, step: int, micro_batch: int, dp_rank: int) -> None:
        self.step, self.micro_batch, self.dp_rank = int(step), int(micro_batch), int(dp_rank)
        self.calls = {}

    def next_key(self, layer_seed: int, role: str) -> int:
        call = self.calls.get(role, 0)
        self.calls[role] = call + 1
        return combine_key(layer_seed, _ROLE_IDS[role], self.step, self.micro_batch, self.dp_rank, call)


_ROLE_IDS = {"x_fwd": 1, "w_fwd": 2, "dy_dgrad": 3, "w_dgrad": 4, "dy_wgrad": 5, "x_wgrad": 6}


def set_step_context(model: nn.Module, step: int, micro_batch: int = 0, dp_rank: int = 0,
                     dp_group=None) -> int:
    """Key the stochastic rounding of every quantized linear in `model` by (step, micro_batch, dp_rank), and give
    fp8_delayed the data-parallel group its amax history is reduced over (so every DP rank holds the same history
    and a checkpoint of one rank's copy restores all). Host-side only; returns the number of layers set."""
    n = 0
    for mod in model.modules():
        recipe = getattr(mod, "recipe", None)
        ctx = getattr(recipe, "rounding", None)
        if isinstance(ctx, RoundingContext):
            ctx.set(step, micro_batch, dp_rank)
            recipe.dp_group = dp_group
            n += 1
    return n
