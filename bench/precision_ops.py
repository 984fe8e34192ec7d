"""aten ops and host syncs per training step, and CPU step time, for each precision recipe on the same small Llama.

Every op a step dispatches is counted with a TorchDispatchMode (on a GPU most are a kernel launch; views and other
metadata ops are counted too); host syncs are `aten._local_scalar_dense` (what `.item()`, `float(t)`, `if t:`
dispatch), counted apart for forward + backward and for torch's foreach AdamW (which reads each parameter's step
count on the host, whatever the recipe). A step is forward (bf16 autocast for the quantized recipes, as the trainer
runs them), cross-entropy, backward and a foreach AdamW step, with every transformer block quantized
(bf16_first_layers = bf16_last_layers = 0), applied as the trainer applies it (`LlamaPlan.apply_precision`: NVFP4
runs q/k/v and w1/w3 as fused groups, `precision/fusion.py`). Step times are CPU time (process_time) per step, the
recipes interleaved step by step so the load of a shared machine hits them alike; ratios are vs fp32.

    python -m bench.precision_ops [--recipes fp32,bf16,fp8_tensorwise,nvfp4 --steps 8 --threads 1]
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.quantize import write_section
from megatron_ext.models import ModelArgs, Transformer
from megatron_ext.models.llama_parallel import LlamaPlan
from megatron_ext.precision import PrecisionConfig, set_step_context

MODEL = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_hidden_dim=128, max_seq_len=64)
SYNC_OPS = ("aten._local_scalar_dense",)


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the context (by overload packet name)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(self.ops[name] for name in SYNC_OPS)


class Run:
    """One recipe's model, optimizer and a fixed batch; `step()` is one training step."""

    def __init__(self, recipe: str, batch: int, seq: int, seed: int = 0, **precision):
        torch.manual_seed(seed)
        self.recipe = recipe
        self.model = Transformer(ModelArgs(**MODEL))
        cfg = PrecisionConfig(recipe=recipe, bf16_first_layers=0, bf16_last_layers=0, **precision)
        if cfg.quantized:  # as the trainer applies it (LlamaPlan.build_stage): same-input linears fused
            LlamaPlan(ModelArgs(**MODEL), cfg).apply_precision(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, MODEL["vocab_size"], (batch, seq + 1), generator=g)
        self.n = 0

    def step(self, model_counter: OpCounter | None = None, optim_counter: OpCounter | None = None) -> None:
        set_step_context(self.model, step=self.n)
        with model_counter if model_counter is not None else _null():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe != "fp32"):
                logits = self.model(self.tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), self.tokens[:, 1:].flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with optim_counter if optim_counter is not None else _null():
            self.opt.step()
        self.n += 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_step(run: Run) -> tuple[OpCounter, OpCounter]:
    """(forward + backward, optimizer step) op counters of one step after a warm-up step (lazily built tables
    and optimizer state are not per-step costs)."""
    run.step()
    model, optim = OpCounter(), OpCounter()
    run.step(model, optim)
    return model, optim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="fp32,bf16,fp8_tensorwise,fp8_delayed,fp8_rowwise,mxfp8,nvfp4")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per recipe (interleaved)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision.md"),
                    help="markdown file whose precision-ops section is (re)written; empty: print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    runs = {r: Run(r, args.batch, args.seq) for r in recipes}
    counts = {r: count_step(run) for r, run in runs.items()}
    times: dict[str, list[float]] = {r: [] for r in recipes}
    for _ in range(args.steps):
        for r, run in runs.items():
            t0 = time.process_time()
            run.step()
            times[r].append(time.process_time() - t0)
    base_ops = sum(c.total for c in counts["fp32"])
    base_t = statistics.median(times["fp32"])
    header = (f"Machine: 2-core CI-class CPU ({platform.machine()}), torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}, shared with other jobs (loaded); {args.threads} "
              f"thread(s). Model: Llama {MODEL['n_layers']} blocks, dim {MODEL['dim']}, {MODEL['n_heads']} heads, "
              f"FFN {MODEL['ffn_hidden_dim']}, every block quantized ({MODEL['n_layers'] * 7} linears); batch "
              f"{args.batch} x {args.seq} tokens; step = forward + loss + backward + AdamW(foreach). Step time: "
              f"median CPU time of {args.steps} interleaved steps.")
    lines = ["| recipe | aten ops / step | vs fp32 | host syncs fwd+bwd | host syncs AdamW | CPU s / step | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in recipes:
        (m, o), t = counts[r], statistics.median(times[r])
        total = m.total + o.total
        lines.append(f"| {r} | {total} | {total / base_ops:.2f}x | {m.syncs} | {o.syncs} | {t:.4f} | "
                     f"{t / base_t:.2f}x |")
    table = "\n".join(lines)
    print(header + "\n\n" + table)
    if args.out:
        cmd = "python -m bench.precision_ops " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(Path(args.out), "precision-ops",
                      f"## aten ops, host syncs and CPU time per training step (`bench/precision_ops.py`)\n\n"
                      f"{header}\n\nCommand: `{cmd.strip()}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
