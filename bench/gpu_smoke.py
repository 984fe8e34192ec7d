"""GPU smoke test: every precision recipe and attention path trains a few steps; resume is exact; a one-rank TP +
FSDP2 harness runs the DTensor paths. Prints a table (and writes it with --out); exit 1 if any case fails.

    python bench/gpu_smoke.py                       # CUDA, small model, seq 1024 (<= 3 minutes on one H100/H200)
    python bench/gpu_smoke.py --device cpu          # the same cases, tiny model (proves the script works)

A case that needs something absent (flash-attn, torchao, a CUDA kernel on CPU) is reported as "skip: why", never as
passed. Checks per case: losses finite, last loss below the first (a model that learns), and for the resume case
bitwise-equal losses after reloading model + optimizer from DCP.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): never let the script directory shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SIZES = {  # model + batch per device kind
    "cuda": dict(model=dict(vocab_size=32000, dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, ffn_hidden_dim=2816,
                            max_seq_len=4096), seq=1024, batch=8, accum=2),
    "cpu": dict(model=dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128,
                           max_seq_len=256), seq=64, batch=4, accum=2),
}
# name -> (precision overrides, model overrides, document mask, parallel overrides)
CASES = [
    ("fp32", {"recipe": "fp32"}, {}, False, {}),
    ("bf16 causal (sdpa)", {"recipe": "bf16"}, {}, False, {}),
    ("bf16 window>=seq (no mask)", {"recipe": "bf16"}, {"sliding_window": 4096}, False, {}),
    ("bf16 window<seq (flex)", {"recipe": "bf16"}, {"sliding_window": 128}, False, {}),
    ("bf16 document mask (flex)", {"recipe": "bf16"}, {}, True, {}),
    ("bf16 flash-attn", {"recipe": "bf16"}, {"attn_backend": "flash"}, False, {}),
    ("bf16 flash-attn window<seq", {"recipe": "bf16"}, {"attn_backend": "flash", "sliding_window": 128}, False, {}),
    ("bf16 compile", {"recipe": "bf16"}, {}, False, {"compile": True}),
    ("bf16 compile + document mask", {"recipe": "bf16"}, {}, True, {"compile": True}),
    # precision.backend auto: torch._scaled_mm FP8 GEMMs on CUDA sm89+, emulation elsewhere
    ("fp8_tensorwise auto", {"recipe": "fp8_tensorwise"}, {}, False, {}),
    ("fp8_tensorwise emulated", {"recipe": "fp8_tensorwise", "backend": "emulated"}, {}, False, {}),
    ("fp8_rowwise torchao", {"recipe": "fp8_rowwise", "backend": "torchao"}, {}, False, {}),
    ("mxfp8 auto", {"recipe": "mxfp8"}, {}, False, {}),
    ("nvfp4 auto", {"recipe": "nvfp4"}, {}, False, {}),
]


LR = 3e-3


class Skip(Exception):
    """The case cannot run here (missing optional package or kernel)."""


def batches(size: dict, steps: int, vocab: int, document_mask: bool, seed: int = 7):
    """Learnable data: each row counts up from a random start in steps of 7 (mod 64), so the next token follows
    from the current one and a working model's loss drops within a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, 64, (size["batch"], 1), generator=g)
        tokens = (start + 7 * torch.arange(size["seq"] + 1)) % min(64, vocab)
        docs = None
        if document_mask:
            cuts = torch.rand(size["batch"], size["seq"] + 1, generator=g) < 4.0 / size["seq"]
            docs = torch.cumsum(cuts.int(), dim=1).to(torch.int32)
        micro = size["batch"] // size["accum"]
        out.append([(tokens[r, :-1], tokens[r, 1:], None if docs is None else docs[r, :-1])
                    for r in (slice(m * micro, (m + 1) * micro) for m in range(size["accum"]))])
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(engine, opt, data) -> tuple[list[float], float]:
    """Losses of each step and the median step time (s); values read once at the end (no per-step sync)."""
    losses, times = [], []
    for step_batches in data:
        _sync(engine.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = engine.forward_backward_step(step_batches)
        engine.clip_grad_norm_(1.0)
        opt.step()
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    return [float(x) for x in losses], sorted(times)[len(times) // 2]


def _check_optional(name: str, precision: dict, model: dict, device) -> None:
    if model.get("attn_backend") == "flash":
        if device.type != "cuda":
            raise Skip("flash-attn runs on CUDA only (CPU uses SDPA)")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise Skip("flash-attn not installed (pip install hibari[gpu])") from None
    if precision.get("backend") == "torchao":
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise Skip("torchao not installed") from None


def run_case(name, precision, model_over, document_mask, parallel_over, size, device, steps) -> dict:
    from megatron_ext.models.llama import ModelArgs
    from megatron_ext.models.llama_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import DistInfo, ParallelConfig

    _check_optional(name, precision, model_over, device)
    note = []
    if parallel_over.get("compile") and device.type != "cuda":
        note.append("compile ignored on CPU")
    if "(flex)" in name and device.type != "cuda":
        note.append("CPU runs the dense mask")
    note = "; ".join(note)
    args = ModelArgs(**{**size["model"], **model_over})
    info = DistInfo(0, 1, 0, device, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = build_engine(args, ParallelConfig(**parallel_over), PrecisionConfig(**precision), info, seed=0)
    opt = torch.optim.AdamW(list(engine.parameters()), lr=LR, weight_decay=0.1, foreach=True)
    losses, step_s = train_steps(engine, opt, batches(size, steps, args.vocab_size, document_mask))
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    tokens = size["batch"] * size["seq"]
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"name": name, "status": "ok" if ok else "FAIL", "first": losses[0], "last": losses[-1],
            "tokens_per_s": tokens / step_s, "peak_mib": mem, "note": note}


def resume_case(size, device, steps) -> dict:
    """Train 2 + k steps; reload the state after 2 into a fresh engine (other seed) and train k: same losses?"""
    import torch.distributed.checkpoint as dcp

    from megatron_ext.models.llama import ModelArgs
    from megatron_ext.models.llama_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import DistInfo, ParallelConfig

    args = ModelArgs(**size["model"])
    info = DistInfo(0, 1, 0, device, None)
    data = batches(size, steps + 2, args.vocab_size, document_mask=True)
    prec = PrecisionConfig(recipe="bf16")

    def fresh(seed):
        eng = build_engine(args, ParallelConfig(), prec, info, seed=seed)
        return eng, torch.optim.AdamW(list(eng.parameters()), lr=LR, weight_decay=0.1, foreach=True)

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        engine, opt = fresh(0)
        train_steps(engine, opt, data[:2])
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save({"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)},
                     checkpoint_id=tmp, no_dist=True)
            cont, _ = train_steps(engine, opt, data[2:])
            engine2, opt2 = fresh(1)
            state = {"model": engine2.model_state_dict(), "optimizer": engine2.optimizer_state_dict(opt2)}
            dcp.load(state, checkpoint_id=tmp, no_dist=True)
            engine2.load_model_state_dict(state["model"])
            engine2.load_optimizer_state_dict(opt2, state["optimizer"])
            resumed, _ = train_steps(engine2, opt2, data[2:])
    finally:
        torch.use_deterministic_algorithms(False)
    diff = max(abs(a - b) for a, b in zip(cont, resumed))
    return {"name": "resume from DCP (bf16, document mask)", "status": "ok" if diff == 0.0 else "FAIL",
            "first": cont[0], "last": resumed[-1], "tokens_per_s": float("nan"), "peak_mib": float("nan"),
            "note": f"max loss diff after reload {diff:.3g}"}


def tp_fsdp_harness(size, device, steps) -> dict:
    """One rank, a 1-rank process group and a (dp=1, tp=1) mesh: the Llama TP plan (sequence + loss parallel) and
    FSDP2 with bf16 params run their DTensor code paths and kernels for real."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from megatron_ext.models.llama import ModelArgs
    from megatron_ext.models.llama_parallel import LlamaPlan
    from parallel.engine import cross_entropy
    from parallel.parallelize import apply_fsdp, load_full_state

    args = ModelArgs(**size["model"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("dp", "tp"))
        plan = LlamaPlan(args)
        model = plan.build_stage(list(range(args.n_layers)), first=True, last=True)
        plan.apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True, loss_parallel=True)
        apply_fsdp(model, plan.fsdp_units(model), mesh["dp"], param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                   cpu_offload=False, reshard_after_forward=True)
        model.to_empty(device=device)
        plan.after_materialize(model)
        load_full_state(model, plan.full_state_dict(0))
        plan.after_materialize(model)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
        losses = []
        for step_batches in batches(size, steps, args.vocab_size, document_mask=False):
            opt.zero_grad(set_to_none=True)
            for tokens, labels, _ in step_batches:
                with loss_parallel():
                    loss = cross_entropy(model(tokens.to(device)), labels.to(device))
                    (loss / len(step_batches)).backward()
            opt.step()
            losses.append(loss.detach())
        losses = [float(x.full_tensor() if hasattr(x, "full_tensor") else x) for x in losses]
    finally:
        dist.destroy_process_group()
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return {"name": "1-rank TP(SP, loss parallel) + FSDP2 bf16", "status": "ok" if ok else "FAIL",
            "first": losses[0], "last": losses[-1], "tokens_per_s": float("nan"), "peak_mib": float("nan"),
            "note": ""}


def table(rows: list[dict]) -> str:
    lines = ["| case | status | first loss | last loss | tokens/s | peak MiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('first', float('nan')):.4f} | "
                     f"{r.get('last', float('nan')):.4f} | {r.get('tokens_per_s', float('nan')):,.0f} | "
                     f"{r.get('peak_mib', float('nan')):,.0f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("hibari: error: --device cuda: no CUDA device visible (use --device cpu to test the script)",
              file=sys.stderr)
        return 2
    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    size = SIZES[device.type]
    wanted = [s.strip() for s in a.only.split(",") if s.strip()]
    jobs = [(c[0], lambda c=c: run_case(*c, size, device, a.steps)) for c in CASES]
    jobs += [("resume", lambda: resume_case(size, device, a.steps)),
             ("harness", lambda: tp_fsdp_harness(size, device, a.steps))]
    rows, t_start = [], time.perf_counter()
    for name, job in jobs:
        if wanted and not any(w in name for w in wanted):
            continue
        t0 = time.perf_counter()
        try:
            row = job()
        except Skip as why:
            row = {"name": name, "status": f"skip: {why}"}
        except Exception as err:  # noqa: BLE001 - a failing case is a table row; the traceback goes to stderr
            traceback.print_exc()
            row = {"name": name, "status": "FAIL", "note": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
        row["note"] = (row.get("note", "") + f" ({time.perf_counter() - t0:.1f} s)").strip()
        rows.append(row)
        print(f"{row['name']}: {row['status']} {row['note']}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"gpu_smoke on {name}, torch {torch.__version__}, {dt.date.today()}, model {size['model']['dim']}d x "
              f"{size['model']['n_layers']} layers, seq {size['seq']}, batch {size['batch']} (accum "
              f"{size['accum']}), {a.steps} steps per case, total {time.perf_counter() - t_start:.0f} s")
    text = header + "\n\n" + table(rows) + "\n"
    print("\n" + text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text, encoding="utf-8")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
