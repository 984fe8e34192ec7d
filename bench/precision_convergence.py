"""Tiny-Llama convergence: BF16 vs FP8 vs NVFP4 (emulated) and NVFP4 ablations, same data, same init.

Trains hibari's Llama (byte-level, vocab 256) for a few hundred steps with a minimal loop (AdamW, warmup + cosine
decay, autocast bf16 for everything that is not a quantized GEMM) on the UTF-8 bytes of a Japanese novel from
`../shared/data` (a synthetic byte corpus when it is missing), then writes a loss-curve PNG and a table to
`bench/results/precision.md`.

Runs: bf16, fp8_tensorwise, nvfp4 (RHT + SR + 2D weights, first/last block BF16), nvfp4 ablations (no RHT, no SR,
no 2D weights, all blocks in NVFP4), nvfp4 with the forward-only BF16 switch at 80% of the tokens.

    python -m bench.precision_convergence [--steps 200 --runs bf16,nvfp4 --threads 1 --out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.quantize import write_section
from hibari.progress import progress_bar
from megatron_ext.models import ModelArgs, Transformer
from megatron_ext.models.llama_parallel import LlamaPlan
from megatron_ext.precision import PrecisionConfig, PrecisionSchedule, set_step_context

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_TEXT = SHARED_DATA / "ja-plain-text" / "aozora" / "bocchan.txt"

RUNS = {
    "bf16": dict(recipe="bf16"),
    "bf16_init_seed1": dict(recipe="bf16", init_seed=1),  # noise floor: same data, another initialization
    "fp8_tensorwise": dict(recipe="fp8_tensorwise"),
    "nvfp4": dict(recipe="nvfp4"),
    "nvfp4_no_rht": dict(recipe="nvfp4", rht=False),
    "nvfp4_no_sr": dict(recipe="nvfp4", stochastic_rounding=False),
    "nvfp4_no_2d": dict(recipe="nvfp4", weight_2d=False),
    "nvfp4_all_layers": dict(recipe="nvfp4", bf16_first_layers=0, bf16_last_layers=0),
    "nvfp4_fwd_switch_0.8": dict(recipe="nvfp4", switch_at=0.8, switch_mode="forward_only"),
}


def load_bytes(n_synthetic: int = 400_000) -> tuple[torch.Tensor, str]:
    if SHARED_TEXT.is_file():
        data = SHARED_TEXT.read_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), f"{SHARED_TEXT.name} (UTF-8 bytes)"
    # synthetic fallback: a seeded order-2 Markov chain over 64 byte values (learnable, not trivial)
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 64, (64, 64, 4), generator=g)
    out = torch.empty(n_synthetic, dtype=torch.long)
    a, b = 1, 2
    choice = torch.randint(0, 4, (n_synthetic,), generator=g)
    for i in range(n_synthetic):
        c = int(table[a, b, choice[i]])
        out[i], a, b = c, b, c
    return out, "synthetic order-2 Markov bytes (shared data missing)"


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, seq: int, n_batches: int = 4) -> float:
    losses = []
    for x, y in batches(data, n_batches, batch, seq, seed=12345):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def train(name: str, overrides: dict, args, train_data, val_data) -> dict:
    overrides = dict(overrides)
    torch.manual_seed(args.seed + overrides.pop("init_seed", 0))
    model_args = ModelArgs(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                           ffn_hidden_dim=args.ffn, max_seq_len=args.seq)
    model = Transformer(model_args)
    cfg = PrecisionConfig(**overrides)
    LlamaPlan(model_args, cfg).apply_precision(model)  # as the trainer does (NVFP4: q/k/v and w1/w3 fused)
    tokens_per_step = args.batch * args.seq
    schedule = PrecisionSchedule(cfg, planned_tokens=args.steps * tokens_per_step)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    curve, events = [], []
    t0 = time.perf_counter()
    with progress_bar(args.steps, desc=name, unit="step") as bar:
        for step, (x, y) in enumerate(batches(train_data, args.steps, args.batch, args.seq, seed=args.seed)):
            msg = schedule.step(step * tokens_per_step, model)
            set_step_context(model, step=step)  # keys the stochastic-rounding noise, as the trainer does
            if msg:
                events.append((step, msg))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            curve.append(loss.item())
            bar.set_postfix(f"loss {loss.item():.3f}")
            bar.advance(1)
    elapsed = time.perf_counter() - t0
    tail = curve[-max(args.steps // 10, 1):]
    return {"name": name, "config": overrides, "curve": curve, "final_train": sum(tail) / len(tail),
            "val": evaluate(model, val_data, args.batch, args.seq), "events": events,
            "s_per_step": elapsed / args.steps}


def smooth(values, k=10):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = v if i == 0 else acc + (v - acc) / min(i + 1, k)
        out.append(acc)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=176)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--from-json", default=None,
                    help="re-render the PNG and table from a previous run's precision_convergence.json (no training)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    data, source = load_bytes()
    split = int(data.numel() * 0.9)
    train_data, val_data = data[:split], data[split:]
    command = "python -m bench.precision_convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        names = [r["name"] for r in results]
        command = results[0].get("command", "python -m bench.precision_convergence")
    else:
        results = [train(n, RUNS[n], args, train_data, val_data) for n in names]
        for r in results:
            r["command"] = command.strip()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_convergence.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    png = out / "precision_convergence.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in results if r["name"] == "bf16"), results[0])
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(13, 5))
    base_s = smooth(base["curve"], 20)
    for r in results:
        ax.plot(smooth(r["curve"]), label=r["name"], lw=1.2)
        rs = smooth(r["curve"], 20)
        ax_d.plot([a - b for a, b in zip(rs, base_s)], label=r["name"], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed)")
    ax.set_ylim(top=min(6.0, max(max(smooth(r["curve"])) for r in results)))
    ax.set_title(f"tiny Llama, {args.layers} blocks x dim {args.dim}, {args.batch * args.seq} tokens/step")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_d.set_xlabel("step")
    ax_d.set_ylabel(f"train loss - {base['name']} (smoothed over 20 steps)")
    ax_d.axhline(0.0, color="k", lw=0.8)
    ax_d.set_ylim(-0.1, 0.1)
    ax_d.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)

    lines = [
        "## Tiny-Llama convergence (`bench/precision_convergence.py`)\n",
        f"Machine: 2-core CI-class CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}. NVFP4: operands quantized bit-exactly, GEMMs on the exact "
        "unscaled values (bf16 on GPU, fp32 on CPU) with the per-tensor factors on the output; FP8: codes + scales, "
        "emulated GEMMs (backend auto on CPU).",
        f"Data: {source}, 90/10 train/val split. Model: Llama {args.layers} blocks, dim {args.dim}, "
        f"{args.heads} heads, FFN {args.ffn}, vocab 256; {args.steps} steps x {args.batch}x{args.seq} tokens, "
        f"AdamW lr {args.lr} (warmup {args.warmup}, cosine to 10%), seed {args.seed}.\n",
        f"Command: `{command}`\n",
        f"![loss curves]({png.name})\n",
        f"| run | final train loss (last 10%) | val loss | val vs {base['name']} | notes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rel = (r["val"] - base["val"]) / base["val"] * 100
        note = "; ".join(m for _, m in r["events"])
        lines.append(f"| {r['name']} | {r['final_train']:.4f} | {r['val']:.4f} | {rel:+.2f}% | {note} |")
    table = "\n".join(lines) + "\n"
    write_section(out / "precision.md", "convergence", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
