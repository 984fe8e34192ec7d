"""NVFP4 quantize throughput on CPU: hibari's quantizer vs straightforward implementations of the same formula.

Baselines, measured in the same run on the same data:
  straightforward  the formula written the obvious way in PyTorch, as TransformerEngine's pure-PyTorch reference
                   does it: per-code boolean masks for the E2M1 rounding (16 masked assignments), then packing;
  scalar           the element-by-element reference (`nvfp4_reference`, numpy float32 scalars) on a small slice.
Both outputs are checked bit for bit (codes and scale bytes) against the fast quantizer.

    python -m bench.quantize [--rows 4096 --cols 4096 --repeats 3 --threads 1 --clock cpu]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megatron_ext.precision import nvfp4
from megatron_ext.precision.nvfp4_reference import quantize_reference


def straightforward_quantize(x: torch.Tensor, tile=(1, 16)):
    """The formula of nvfp4.md in plain PyTorch (TE-reference style). Returns (packed codes, scales e4m3)."""
    x = x.to(torch.float32)
    m, n = x.shape
    tr, tc = tile
    amax = x.abs().max()
    g_enc = torch.tensor(2688.0) / amax if amax > 0 else torch.tensor(1.0)
    g_enc = torch.clamp(g_enc, max=torch.finfo(torch.float32).max)
    g_dec = 1.0 / g_enc
    tiles = x.reshape(m // tr, tr, n // tc, tc).permute(0, 2, 1, 3)  # [mt, nt, tr, tc]
    bmax = tiles.abs().amax(dim=(2, 3), keepdim=True)
    s = torch.clamp(bmax * (g_enc * torch.tensor(1.0 / 6.0)), -448, 448).to(torch.float8_e4m3fn)
    enc = torch.clamp(1.0 / (s.to(torch.float32) * g_dec), max=torch.finfo(torch.float32).max)
    v = torch.clamp(tiles * enc, -6.0, 6.0).permute(0, 2, 1, 3).reshape(m, n)
    r = torch.zeros_like(v, dtype=torch.uint8)
    r[(v >= 0.0) & (v <= 0.25)] = 0
    r[(v > 0.25) & (v < 0.75)] = 1
    r[(v >= 0.75) & (v <= 1.25)] = 2
    r[(v > 1.25) & (v < 1.75)] = 3
    r[(v >= 1.75) & (v <= 2.5)] = 4
    r[(v > 2.5) & (v < 3.5)] = 5
    r[(v >= 3.5) & (v <= 5.0)] = 6
    r[v > 5.0] = 7
    r[(v >= -0.25) & (v < -0.0)] = 8
    r[(v < -0.25) & (v > -0.75)] = 9
    r[(v <= -0.75) & (v >= -1.25)] = 10
    r[(v < -1.25) & (v > -1.75)] = 11
    r[(v <= -1.75) & (v >= -2.5)] = 12
    r[(v < -2.5) & (v > -3.5)] = 13
    r[(v <= -3.5) & (v >= -5.0)] = 14
    r[v < -5.0] = 15
    return r[:, ::2] + r[:, 1::2] * 16, s.reshape(m // tr, n // tc)


_CLOCK = time.perf_counter


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in a results markdown file."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Precision recipes: benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = _CLOCK()
        fn()
        best = min(best, _CLOCK() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine; use with --threads 1); wall: elapsed")
    ap.add_argument("--scalar-rows", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision.md"),
                    help="markdown file whose quantize section is (re)written; empty: print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _CLOCK
    _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.cols, generator=gen) * torch.exp(torch.randn(args.rows, 1, generator=gen))
    n_el = x.numel()
    header = (f"Machine: 2-core CI-class CPU ({platform.machine()}), torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}; {args.threads} thread(s), {args.clock} clock, best of "
              f"{args.repeats}; tensor {args.rows}x{args.cols} float32 ({n_el / 1e6:.1f}M elements), "
              f"Gaussian x per-row log-normal scale.")
    print(header)
    rows = []
    for tile in ((1, 16), (16, 16)):
        fast = nvfp4.quantize(x, tile)
        codes, scales = straightforward_quantize(x, tile)
        identical = torch.equal(fast.codes, codes) and torch.equal(fast.scales.view(torch.uint8),
                                                                   scales.view(torch.uint8))
        t_fast = _best_time(lambda: nvfp4.quantize(x, tile), args.repeats)
        t_base = _best_time(lambda: straightforward_quantize(x, tile), args.repeats)
        rows.append((f"{tile[0]}x{tile[1]} RNE", n_el / t_fast, n_el / t_base, t_base / t_fast, identical))

    sl = x[: args.scalar_rows]
    c_ref, s_ref, _ = quantize_reference(sl.numpy(), (1, 16))
    t0 = _CLOCK()
    quantize_reference(sl.numpy(), (1, 16))
    t_scalar = _CLOCK() - t0
    q_sl = nvfp4.quantize(sl)
    scalar_identical = bool(np.array_equal(q_sl.element_codes().numpy(), c_ref)
                            and np.array_equal(q_sl.scales.view(torch.uint8).numpy(), s_ref))
    t_fast_sl = _best_time(lambda: nvfp4.quantize(sl), args.repeats)

    t_sr = _best_time(lambda: nvfp4.quantize(x, (1, 16), "stochastic", torch.Generator().manual_seed(1)),
                      args.repeats)

    lines = ["| quantizer | fast (M elem/s) | baseline (M elem/s) | speedup | bit-identical |", "|---|---|---|---|---|"]
    for name, f, b, sp, ok in rows:
        lines.append(f"| {name} vs straightforward | {f / 1e6:.1f} | {b / 1e6:.1f} | {sp:.1f}x | {ok} |")
    lines.append(f"| 1x16 RNE vs scalar reference ({sl.numel()} elem) | {sl.numel() / t_fast_sl / 1e6:.1f} | "
                 f"{sl.numel() / t_scalar / 1e6:.3f} | {t_scalar / t_fast_sl:.0f}x | {scalar_identical} |")
    lines.append(f"| 1x16 stochastic rounding (fast only) | {n_el / t_sr / 1e6:.1f} | - | - | - |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        cmd = "python -m bench.quantize " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(Path(args.out), "quantize",
                      f"## NVFP4 quantize throughput (`bench/quantize.py`)\n\n{header}\n\n"
                      f"Command: `{cmd.strip()}`\n\n{table}\n")
    ok = all(r[4] for r in rows) and scalar_identical
    print("\nall outputs bit-identical" if ok else "\nMISMATCH between implementations")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
