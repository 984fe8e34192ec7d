"""Training throughput of a ~1B Llama (Llama-3.2-1B shape) at seq 4096 in bf16 on one GPU: hibari's engine vs a
plain-PyTorch loop of the same model in the same run, eager vs torch.compile, causal (no mask) vs the dense mask
hibari used to build, then a torch.profiler summary of the engine step (top kernels, GPU idle fraction, host syncs).

    python bench/gpu_train.py [--steps 10] [--out bench/results/gpu.md]          # <= 6 minutes on one H100/H200
    python bench/gpu_train.py --device cpu                                       # tiny model: proves the script

Both loops: bf16 autocast over fp32 master weights, fp32 cross-entropy, global-norm clipping at 1.0, AdamW
(fused on CUDA), the same batches; the engine loop is what `hibari train` runs on one GPU (forward_backward_step,
clip_grad_norm_ on device, no host sync until the end). tokens/s = tokens per optimizer step / median step time after
`--warmup` steps; MFU against the dense bf16 peak of the exact device (parallel.flops).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): never let the script directory shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LLAMA_32_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192,
                   norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True,
                   rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
SETUPS = {
    "cuda": dict(model=LLAMA_32_1B, seq=4096, micro=2, accum=2),
    "cpu": dict(model=dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=256,
                           max_seq_len=256, tie_embeddings=True), seq=128, micro=2, accum=2),
}


def make_batches(setup: dict, vocab: int, n: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (setup["micro"] * setup["accum"], setup["seq"] + 1), generator=g)
        out.append([(tokens[i::setup["accum"], :-1], tokens[i::setup["accum"], 1:]) for i in range(setup["accum"])])
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(params, device):
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **kw)


def engine_loop(args, device, compile_blocks: bool, dense_mask: bool):
    """Step function of hibari's engine (bf16) on one device."""
    return engine_step(make_engine(args, device, compile_blocks), device, dense_mask)


def make_engine(args, device, compile_blocks: bool = False, precision=None, **parallel):
    """hibari's engine on one device, built as `hibari train` builds it (`build_engine`: a quantized `precision`
    recipe goes through `LlamaPlan.apply_precision`, same-input linears fused); default recipe bf16. `parallel`:
    more ParallelConfig fields (e.g. activation_checkpoint)."""
    from megatron_ext.models.llama_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import DistInfo, ParallelConfig

    return build_engine(args, ParallelConfig(compile=compile_blocks, **parallel),
                        precision or PrecisionConfig(recipe="bf16"), DistInfo(0, 1, 0, device, None), seed=0)


def engine_step(engine, device, dense_mask: bool = False, rounding_context: bool = False):
    """One optimizer step of `engine` (+ its AdamW): forward_backward_step, clip_grad_norm_, opt.step. With
    `rounding_context` the stochastic-rounding context is set before each micro-batch, as the trainer does."""
    from megatron_ext.models import attention as attn

    opt = _optimizer(list(engine.parameters()), device)
    engine.set_train(True)
    docs_cache = {}
    n_step = [0]

    def before_micro_batch(micro):
        from megatron_ext.precision import set_step_context

        for part in engine.model_parts:
            set_step_context(part, step=n_step[0], micro_batch=micro, dp_rank=engine.dp_rank)

    def step(micro_batches):
        if dense_mask:  # the old path: all-zero document ids and no FlexAttention -> a dense [b, 1, S, S] mask
            attn.FLEX_DEVICE_TYPES.discard(device.type)
        batches = []
        for tokens, labels in micro_batches:
            docs = None
            if dense_mask:
                docs = docs_cache.setdefault(tokens.shape, torch.zeros(tokens.shape, dtype=torch.int32))
            batches.append((tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True), docs))
        opt.zero_grad(set_to_none=True)
        loss = engine.forward_backward_step(batches, before_micro_batch if rounding_context else None)
        engine.clip_grad_norm_(1.0)
        opt.step()
        n_step[0] += 1
        if dense_mask:
            attn.FLEX_DEVICE_TYPES.add("cuda")
        return loss

    step.optimizer = opt
    return step


def plain_loop(args, device, compile_blocks: bool):
    """The same model, the same numerics, written with nothing but torch."""
    from megatron_ext.models.llama import Transformer

    torch.manual_seed(0)
    model = Transformer(args).to(device).train()
    if compile_blocks and device.type == "cuda":
        for block in model.layers.values():
            block.compile()
    opt = _optimizer(list(model.parameters()), device)

    def step(micro_batches):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for tokens, labels in micro_batches:
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(tokens)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return total

    return step


def measure(step, batches, device, warmup: int) -> tuple[float, float, float]:
    """(median step time s, peak memory MiB, last loss)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], None
    for i, b in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        loss = step(b)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], mem, float(loss)


def profile_summary(step, batches, device) -> str:
    """Top kernels (or CPU ops), GPU idle fraction and host syncs per step over len(batches) engine steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        _sync(device)
    wall = time.perf_counter() - t0
    events = prof.events()
    sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    syncs = sum(1 for e in events if e.name in sync_names)
    reads = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    n = len(batches)
    lines = [f"profiled {n} engine steps (+ AdamW): {wall:.2f} s wall; per step: {syncs / n:.1f} CUDA synchronize "
             f"calls, {reads / n:.1f} scalar reads (.item(); a host sync when the tensor is on the GPU; on CPU "
             f"they include AdamW's step counters)"]
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, end = 0.0, float("-inf")
        for s, e in spans:  # union of kernel intervals (us)
            if e > end:
                busy += e - max(s, end)
                end = e
        total = (spans[-1][1] - spans[0][0]) if spans else 0.0
        lines.append(f"GPU idle fraction between the first and last kernel: {1 - busy / total:.1%}" if total
                     else "no CUDA kernels recorded")
        sort_by = "self_cuda_time_total"
    else:
        sort_by = "self_cpu_time_total"
    lines.append("")
    lines.append(prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=60))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results (markdown) here, e.g. bench/results/gpu.md")
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("hibari: error: --device cuda: no CUDA device visible (use --device cpu to test the script)",
              file=sys.stderr)
        return 2
    from megatron_ext.models.llama import ModelArgs
    from parallel.flops import peak_flops

    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    setup = SETUPS[device.type]
    args = ModelArgs(**setup["model"])
    tokens_per_step = setup["micro"] * setup["accum"] * setup["seq"]
    flops_per_token = args.flops_per_token(setup["seq"])
    peak = peak_flops(device, "bf16")
    batches = make_batches(setup, args.vocab_size, a.warmup + a.steps)

    configs = [("plain PyTorch, eager", lambda: plain_loop(args, device, False)),
               ("hibari engine, eager", lambda: engine_loop(args, device, False, dense_mask=False)),
               ("hibari engine, eager, dense mask (old path)", lambda: engine_loop(args, device, False, True))]
    if not a.skip_compile:
        configs += [("plain PyTorch, compile per block", lambda: plain_loop(args, device, True)),
                    ("hibari engine, compile per block", lambda: engine_loop(args, device, True, dense_mask=False))]
    rows, best = [], None
    t_start = time.perf_counter()
    for name, make in configs:
        step = make()
        step_s, mem, loss = measure(step, batches, device, a.warmup)
        tps = tokens_per_step / step_s
        mfu = tps * flops_per_token / peak if peak else None
        rows.append((name, tps, mfu, mem, loss))
        print(f"{name}: {tps:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, peak {mem:,.0f} MiB, "
              f"loss {loss:.3f}", flush=True)
        if name.startswith("hibari engine") and "dense" not in name and (best is None or tps > best[1]):
            best = (name, tps, step)
        else:
            del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = {n: t for n, t, *_ in rows}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"## GPU training throughput: {args.num_params() / 1e9:.2f}B Llama (Llama-3.2-1B shape), seq "
             f"{setup['seq']}, bf16" if device.type == "cuda" else
             f"## gpu_train --device cpu (tiny model, seq {setup['seq']}: checks the script, not a measurement)",
             "",
             f"{name}, torch {torch.__version__}, {dt.date.today()}; micro batch {setup['micro']} x grad accum "
             f"{setup['accum']} = {tokens_per_step:,} tokens per step; median of {a.steps} steps after {a.warmup} "
             f"warm-up; peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} dense bf16.",
             "", "| configuration | tokens/s | MFU | vs plain (same compile mode) | peak MiB | loss |",
             "|---|---|---|---|---|---|"]
    for n, tps, mfu, mem, loss in rows:
        ref = baseline.get("plain PyTorch, compile per block" if "compile" in n else "plain PyTorch, eager")
        lines.append(f"| {n} | {tps:,.0f} | {'n/a' if mfu is None else f'{mfu:.1%}'} | {tps / ref:.2f}x | "
                     f"{mem:,.0f} | {loss:.3f} |")
    if best is not None:
        lines += ["", f"### Profile of `{best[0]}`", "", "```",
                  profile_summary(best[2], batches[:3], device), "```"]
    lines.append(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
