"""Streaming conversion benchmark: peak RSS and throughput of HF -> hibari -> HF vs `cp` of the same bytes.

    python -m bench.convert [--gb 2.0] [--rounds 2] [--workdir /tmp/hibari-bench-convert]

Builds a synthetic Llama-shaped bf16 HF checkpoint of about --gb gigabytes, then runs each conversion in a fresh
subprocess and reports its peak RSS (sampled in the child) next to the largest single tensor, and its throughput
next to `cp` of the same files from page cache, measured in the same run, interleaved (cp, hf-to-hibari, cp,
hibari-to-hf, ... for --rounds rounds; best round quoted). The conversion is timed inside the child, after its
imports (interpreter + torch start-up is not conversion work). Inputs are read once before timing (page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, gb: float) -> dict:
    import torch
    from safetensors.torch import save_file

    from checkpoints.hf_mapping import expected_shapes, hf_config_from_model_args, hibari_to_hf_name
    from megatron_ext.models import ModelArgs

    # Llama-2-like proportions; layers chosen to reach the requested size in bf16
    dim, ffn, vocab = 2048, 5504, 32000
    per_layer = (4 * dim * dim + 3 * dim * ffn) * 2
    n_layers = max(1, int((gb * 1e9 - 2 * vocab * dim * 2) / per_layer))
    args = ModelArgs(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=16, ffn_hidden_dim=ffn)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_shapes(args).items():
        tensors[hibari_to_hf_name(name)] = (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).to(
            torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = hf_config_from_model_args(args)
    (out / "config.json").write_text(json.dumps(cfg))
    return {"largest_tensor_bytes": largest, "total_bytes": total, "n_layers": n_layers}


_SAMPLER = """
import re, threading, time
def _rss():
    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
_peak = [0]
def _sample():
    while True:
        _peak[0] = max(_peak[0], _rss()); time.sleep(0.002)
import torch, checkpoints.convert
_base = _rss()
threading.Thread(target=_sample, daemon=True).start()
"""


def child_with_rss(code: str, tree: Path = ROOT) -> tuple[float, float, float]:
    """Run `code` in a fresh process after importing torch + hibari; return (seconds of `code` measured in the
    child, RSS after imports, peak RSS growth during `code`), RSS sampled every 2 ms."""
    wrapped = (_SAMPLER + "_t0 = time.perf_counter()\n" + code + "\n_dt = time.perf_counter() - _t0"
               "\nprint('RSS', _dt, _base, max(_peak[0], _rss()) - _base)")
    r = subprocess.run([sys.executable, "-c", wrapped], check=True, cwd=tree, capture_output=True, text=True)
    dt, base, growth = [line for line in r.stdout.splitlines() if line.startswith("RSS ")][-1].split()[1:]
    return float(dt), float(base), float(growth)


def cp_seconds(src: Path, dst: Path) -> float:
    """`cp -r` of a directory (page cache to page cache, as the converters)."""
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    dt = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return dt


def _warm(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline-tree", default=None,
                    help="another hibari source tree (e.g. a copy of an older commit): its converters are timed "
                         "too, interleaved, as the before/after baseline")
    ap.add_argument("--workdir", default="/tmp/hibari-bench-convert")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "convert.md"))
    a = ap.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    info = make_checkpoint(work / "hf", a.gb)
    total = info["total_bytes"]

    trees = {"": ROOT} | ({" (baseline tree)": Path(a.baseline_tree).resolve()} if a.baseline_tree else {})
    copies: list[float] = []
    to_hibari: dict[str, list] = {k: [] for k in trees}
    to_hf: dict[str, list] = {k: [] for k in trees}
    for _ in range(a.rounds):  # interleaved: load from other jobs hits the copy and the converters alike
        for label, tree in trees.items():
            _warm(work / "hf")
            copies.append(cp_seconds(work / "hf", work / "copy"))
            shutil.rmtree(work / "ckpt", ignore_errors=True)
            to_hibari[label].append(child_with_rss(
                f"from checkpoints.convert import hf_to_hibari; hf_to_hibari({str(work / 'hf')!r}, "
                f"{str(work / 'ckpt')!r})", tree))
            _warm(work / "ckpt")
            copies.append(cp_seconds(work / "ckpt", work / "copy"))
            shutil.rmtree(work / "back", ignore_errors=True)
            to_hf[label].append(child_with_rss(
                f"from checkpoints.convert import hibari_to_hf; hibari_to_hf({str(work / 'ckpt')!r}, "
                f"{str(work / 'back')!r}, max_shard_size='1GB')", tree))
    copy_s = min(copies)
    baseline_rss = min(to_hibari[""])[1]
    gb = total / 1e9
    rows = [("`cp -r` of the same files (baseline)", copy_s, None)]
    for label in trees:
        rows.append((f"hf-to-hibari{label}", *min(to_hibari[label])[::2]))
        rows.append((f"hibari-to-hf (1 GB shards){label}", *min(to_hf[label])[::2]))
    lines = [
        "## Checkpoint conversion (bench/convert.py)",
        "",
        f"Machine: 2-core CI-class CPU ({platform.processor() or platform.machine()}), date {date.today()}, "
        f"command `python -m bench.convert --gb {a.gb} --rounds {a.rounds}"
        f"{' --baseline-tree ' + a.baseline_tree if a.baseline_tree else ''}`; machine shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f}).",
        f"Synthetic bf16 Llama-shaped checkpoint: {gb:.2f} GB, {info['n_layers']} layers, largest tensor "
        f"{info['largest_tensor_bytes'] / 1e6:.0f} MB; RSS of a process that only imports torch + hibari: "
        f"{baseline_rss / 1e6:.0f} MB.",
        "",
        "Peak RSS growth = peak resident memory during the conversion minus the process's RSS after importing torch "
        "and hibari (sampled every 2 ms).",
        "",
        "| step | seconds | GB/s | x copy speed | peak RSS growth (MB) | growth / largest tensor |",
        "|---|---|---|---|---|---|",
    ]
    for name, s, rss in rows:
        rel = copy_s / s
        rss_s = f"{rss / 1e6:.0f}" if rss else "-"
        extra = f"{rss / info['largest_tensor_bytes']:.1f}x" if rss else "-"
        lines.append(f"| {name} | {s:.2f} | {gb / s:.2f} | {rel:.2f} | {rss_s} | {extra} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
