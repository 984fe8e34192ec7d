"""Training step time of a ~1B Llama (Llama-3.2-1B shape) at seq 4096 per precision recipe on one GPU, all recipes
in the same run: bf16, fp8_tensorwise, nvfp4, and nvfp4 after the forward-only precision switch (issue 17).

    python bench/gpu_precision.py [--steps 8] [--out bench/results/gpu.md]     # <= 10 minutes on one H100/H200
    python bench/gpu_precision.py --device cpu                                # tiny model: proves the script

--out rewrites only its `<!-- gpu-precision -->` section (`bench/quantize.write_section`); gpu_train.py --out
rewrites the whole file, so run it first when both write bench/results/gpu.md.

Every recipe is hibari's engine built as `hibari train` builds it (`bench/gpu_train.py`'s `make_engine` ->
`build_engine` -> `LlamaPlan.apply_precision`): bf16 autocast over fp32 master weights, fused AdamW, clipping at
1.0, the stochastic-rounding context set per micro-batch as the trainer sets it. Recipes:

  bf16                  the baseline;
  fp8_tensorwise        precision.backend auto: real `torch._scaled_mm` FP8 GEMMs on sm89+ (emulation elsewhere);
  nvfp4                 hibari's NVFP4 (bf16 GEMMs on exactly-representable operands), q/k/v and w1/w3 run as
                        fused groups (`precision/fusion.py`);
  nvfp4 forward_only    the nvfp4 engine itself, `set_precision_mode(model, "forward_only")` before its steps (the
                        precision switch: fprop in bf16, dgrad/wgrad quantized; the fused groups are not used) and
                        "quantized" again before the nvfp4 steps (one copy of the weights and AdamW state).

The first/last block rule is hibari's default for every recipe (PrecisionConfig's bf16_first_layers = 1,
bf16_last_layers = 1: the first and last transformer blocks stay in bf16), so the numbers are those of a default
config. The recipes' measured steps are interleaved step by step (one round = one step of each recipe, same batch),
so a shared machine's load hits them alike; ratios vs bf16 are from the same run. Peak memory per recipe = the peak
during its own steps minus what was allocated before them, plus its own resident state (parameters, gradients,
AdamW state): what that recipe alone would need, although all engines are resident together (bf16, fp8, nvfp4:
~3 x 20 GB of fp32 weights, gradients and AdamW state + one step's activations fit a 139 GiB H200 without activation
checkpointing by estimate; `--activation-checkpoint full` if not). Host syncs: scalar
reads (`aten._local_scalar_dense`, what `.item()` dispatches) in one extra, untimed step.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules: never let the script directory shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.gpu_train import SETUPS, _sync, engine_step, make_batches, make_engine  # noqa: E402
from bench.precision_ops import OpCounter  # noqa: E402
from bench.quantize import write_section  # noqa: E402

# recipe label -> (PrecisionConfig recipe, QuantizedLinear mode after the build)
RECIPES = {"bf16": ("bf16", None), "fp8_tensorwise": ("fp8_tensorwise", None), "nvfp4": ("nvfp4", None),
           "nvfp4 forward_only": ("nvfp4", "forward_only")}
FP8_GOAL, NVFP4_GOAL = 1.3, 1.5  # issue 17: fp8 >= 1.3x bf16 tokens/s; nvfp4 <= 1.5x bf16 step time
# the cpu setup of gpu_train has 2 blocks: with the default first/last bf16 blocks nothing would be quantized
CPU_LAYERS = 4


@contextlib.contextmanager
def count_fused_calls():
    """Counts calls of the fused NVFP4 autograd Function by number of member linears (1 = a linear alone)."""
    from megatron_ext.precision import fusion

    calls: collections.Counter = collections.Counter()
    original = fusion._FusedNVFP4

    class _Counting:
        @staticmethod
        def apply(plan, out_dtype, x, *ws):
            calls[len(ws)] += 1
            return original.apply(plan, out_dtype, x, *ws)

    fusion._FusedNVFP4 = _Counting
    try:
        yield calls
    finally:
        fusion._FusedNVFP4 = original


def layout(engine) -> tuple[int, int, list[str]]:
    """(QuantizedLinear modules, fused groups, names of the blocks holding quantized linears) of the engine."""
    from megatron_ext.precision.linear import QuantizedLinear

    quantized, groups, blocks = 0, set(), set()
    for part in engine.model_parts:
        for name, mod in part.named_modules():
            if isinstance(mod, QuantizedLinear):
                quantized += 1
                blocks.add(".".join(name.split(".")[:2]))
                group = mod.__dict__.get("_fusion_group")
                if group is not None:
                    groups.add(id(group))
    return quantized, len(groups), sorted(blocks, key=lambda b: int(b.split(".")[1]))


def resident_bytes(engine, optimizer) -> int:
    tensors = {id(p): p for p in engine.parameters()}
    tensors.update({id(p.grad): p.grad for p in engine.parameters() if p.grad is not None})
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Recipe:
    """One recipe's engine, step function and measurements. `share`: a Recipe of the same PrecisionConfig recipe
    whose engine and optimizer this one uses (nvfp4 and nvfp4 forward_only: one engine, its linears' mode set before
    each step; saves a ~20 GB copy of weights, gradients and AdamW state)."""

    def __init__(self, label: str, args, device, share: "Recipe | None" = None, **parallel):
        from megatron_ext.precision.config import PrecisionConfig

        recipe, self.mode = RECIPES[label]
        self.label, self.device = label, device
        self.cfg = PrecisionConfig(recipe=recipe)  # hibari's defaults: first/last block bf16, backend auto
        if share is not None:
            self.engine, self.step = share.engine, share.step
        else:
            self.engine = make_engine(args, device, precision=self.cfg, **parallel)
            self.step = engine_step(self.engine, device, rounding_context=self.cfg.quantized)
        self.quantized, self.groups, self.blocks = layout(self.engine)
        self.times: list[float] = []
        self.peak = 0
        self.loss = float("nan")
        self.syncs = 0
        self.fused: dict[int, int] = {}

    def set_mode(self) -> None:
        from megatron_ext.precision import set_precision_mode

        if self.cfg.quantized:
            for part in self.engine.model_parts:
                set_precision_mode(part, self.mode or "quantized")

    def run(self, batch, timed: bool) -> None:
        self.set_mode()
        dev = self.device
        _sync(dev)
        if dev.type == "cuda":
            before = torch.cuda.memory_allocated(dev)
            own = resident_bytes(self.engine, self.step.optimizer)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        loss = self.step(batch)
        _sync(dev)
        if timed:
            self.times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(dev) - before + own)
        self.loss = loss

    def count(self, batch) -> None:
        """One untimed step under an op counter: scalar reads (host syncs) and fused-Function calls."""
        self.set_mode()
        counter = OpCounter()
        try:
            with count_fused_calls() as calls, counter:
                self.step(batch)
            self.syncs = counter.syncs
        except Exception as err:  # noqa: BLE001 - a dispatch mode some kernel rejects must not lose the timings
            self.syncs = f"n/a ({type(err).__name__})"
            with count_fused_calls() as calls:
                self.step(batch)
        _sync(self.device)
        self.fused = dict(sorted(calls.items()))

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _goal(label: str, tps_ratio: float, time_ratio: float) -> str:
    if label.startswith("fp8"):
        return f"tokens/s >= {FP8_GOAL:.2f}x bf16: {'met' if tps_ratio >= FP8_GOAL else 'NOT met'}"
    if label.startswith("nvfp4"):
        return f"step time <= {NVFP4_GOAL:.2f}x bf16: {'met' if time_ratio <= NVFP4_GOAL else 'NOT met'}"
    return "baseline"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per recipe (interleaved)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per recipe first")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {list(RECIPES)}")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="stop the measured rounds early past this (at least one measured round runs)")
    parser.add_argument("--activation-checkpoint", choices=["none", "full", "selective"], default="none",
                        help="parallel.activation_checkpoint of every engine (only if the default does not fit)")
    parser.add_argument("--out", type=Path, help="write the gpu-precision section here, e.g. bench/results/gpu.md")
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("hibari: error: --device cuda: no CUDA device visible (use --device cpu to test the script)",
              file=sys.stderr)
        return 2
    labels = a.recipes.split(",")
    unknown = [r for r in labels if r not in RECIPES]
    if unknown or a.steps < 1:
        print(f"hibari: error: --recipes: unknown {unknown}, expected names from {list(RECIPES)}" if unknown else
              "hibari: error: --steps: expected >= 1", file=sys.stderr)
        return 2
    if "bf16" not in labels:
        labels.insert(0, "bf16")
    from megatron_ext.models.llama import ModelArgs

    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    setup = SETUPS[device.type]
    model = setup["model"] if device.type == "cuda" else dict(setup["model"], n_layers=CPU_LAYERS)
    args = ModelArgs(**model)
    tokens_per_step = setup["micro"] * setup["accum"] * setup["seq"]
    batches = make_batches(setup, args.vocab_size, a.warmup + a.steps + 1)

    t_start = time.perf_counter()
    runs: list[Recipe] = []
    try:
        for label in labels:
            share = next((r for r in runs if r.cfg.recipe == RECIPES[label][0]), None)
            runs.append(Recipe(label, args, device, share, activation_checkpoint=a.activation_checkpoint))
        print(f"built {len({id(r.engine) for r in runs})} engines in {time.perf_counter() - t_start:.0f} s",
              flush=True)
        for i, batch in enumerate(batches[:-1]):  # rounds: one step of each recipe on the same batch
            for r in runs:
                r.run(batch, timed=i >= a.warmup)
            if i == a.warmup:
                print(f"round {i}: " + ", ".join(f"{r.label} {r.times[-1]:.3f} s" for r in runs), flush=True)
            if i >= a.warmup and time.perf_counter() - t_start > a.max_seconds:
                print(f"--max-seconds {a.max_seconds:.0f} reached after {i + 1 - a.warmup} measured round(s)")
                break
        for r in runs:
            r.count(batches[-1])
    except torch.OutOfMemoryError:
        print(f"hibari: error: out of GPU memory with {len(runs)} recipe(s) built; rerun with "
              f"--activation-checkpoint full or fewer --recipes", file=sys.stderr)
        return 1

    base = runs[0]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (f"## Precision recipes, training step time: {args.num_params() / 1e9:.2f}B Llama (Llama-3.2-1B shape), "
             f"seq {setup['seq']} (`bench/gpu_precision.py`)" if device.type == "cuda" else
             f"## gpu_precision --device cpu (tiny model, {args.n_layers} blocks, seq {setup['seq']}: checks the "
             f"script, not a measurement)")
    quantized_blocks = next((r.blocks for r in runs if r.blocks), [])
    lines = [title, "",
             f"{dev_name}, torch {torch.__version__}, {dt.date.today()}; hibari engine, eager; micro batch "
             f"{setup['micro']} x grad accum {setup['accum']} = {tokens_per_step:,} tokens per step; median of "
             f"{len(base.times)} interleaved steps after {a.warmup} warm-up; activation checkpoint "
             f"{a.activation_checkpoint}; first/last block bf16 (hibari's defaults), quantized blocks "
             f"{quantized_blocks}; fp8 GEMMs: "
             f"{'torch._scaled_mm' if _scaled_mm(device) else 'emulated'}.",
             "", "| recipe | step s | tokens/s | tokens/s vs bf16 | step time vs bf16 | peak MiB | host syncs / step | "
             "quantized linears | fused groups | fused calls / step (members: calls) | loss | goal (issue 17) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = r.median
        tps, tps_ratio, time_ratio = tokens_per_step / t, base.median / t, t / base.median
        peak = f"{r.peak / 2**20:,.0f}" if device.type == "cuda" else "n/a"
        fused = ", ".join(f"{k}: {v}" for k, v in r.fused.items()) or "0"
        lines.append(f"| {r.label} | {t:.4f} | {tps:,.0f} | {tps_ratio:.2f}x | {time_ratio:.2f}x | {peak} | "
                     f"{r.syncs} | {r.quantized} | {r.groups} | {fused} | {float(r.loss):.3f} | "
                     f"{_goal(r.label, tps_ratio, time_ratio)} |")
    lines.append(f"\n(total {time.perf_counter() - t_start:.0f} s; host syncs on CPU include AdamW's step counters)")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        write_section(a.out, "gpu-precision", text)
    return 0


def _scaled_mm(device) -> bool:
    from megatron_ext.precision.gemm import use_scaled_mm

    return use_scaled_mm("auto", device)


if __name__ == "__main__":
    sys.exit(main())
