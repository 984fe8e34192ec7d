"""Training throughput of the tiny model on CPU: hibari (engine + loop, one process) vs a plain `transformers`
LlamaForCausalLM + AdamW loop on the same model shape, batch, data and thread count, measured in the same run.

    python bench/train_cpu.py [--steps 30] [--layouts dp2,tp2,pp2,dp2xtp2] [--out bench/results/train_cpu.md]

tokens/s = global batch x seq / step time, the median over steps after `--skip` warm-up steps. The hibari and
transformers steps alternate one by one in one process, so load from other jobs on a shared machine hits both alike;
`hibari train` end to end is measured separately. `--layouts` also runs
`hibari launch local` for each layout (gloo) and reports tokens/s against the one-process hibari number.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): never let the script directory shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = REPO / "configs" / "tiny.yaml"
LAYOUTS = {"1proc": (1, []), "dp2": (2, ["parallel.dp_shard=2"]), "tp2": (2, ["parallel.tp=2"]),
           "pp2": (2, ["parallel.pp=2"]), "dp2xtp2": (4, ["parallel.tp=2"])}


def bench_overrides(steps: int) -> list[str]:
    return [f"train.steps={steps}", "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
            "log.plot=false", "log.progress=false", "lr.schedule=constant", "lr.warmup_steps=0"]


def hibari_tokens_per_s(steps: int, skip: int, workdir: Path) -> tuple[float, dict]:
    from hibari.config import load_config
    from megatron_ext.train.config import TrainConfig
    from megatron_ext.train.loop import train
    from megatron_ext.train.metrics import read_metrics

    run = workdir / f"hibari-{time.monotonic_ns()}"
    cfg = load_config(TrainConfig, TINY, [f"run.dir={run}", *bench_overrides(steps)])
    train(cfg)
    recs = read_metrics(run)[skip:]
    shutil.rmtree(run, ignore_errors=True)
    return statistics.median(r["tokens_per_s"] for r in recs), cfg


def _hf_model(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_hidden_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa"))
    return model.train()


def interleaved_steps(cfg, steps: int, skip: int) -> tuple[float, float]:
    """(hibari, transformers) tokens/s with the two training steps alternating one by one, so that load from
    other jobs on a shared machine hits both equally.

    hibari's step is the loop's step: Engine.forward_backward per micro batch, Engine.clip_grad_norm_, AdamW from
    megatron_ext.train.optim (weight-decay mask). The baseline is what a user would write with transformers:
    LlamaForCausalLM, cross-entropy on the logits, clip_grad_norm_, torch.optim.AdamW (foreach).
    """
    import torch

    from megatron_ext.train.data import SyntheticDataset, micro_batches
    from megatron_ext.train.optim import build_optimizer
    from megatron_ext.models.llama_parallel import build_engine
    from parallel import init_distributed, validate_layout

    m, t = cfg.model, cfg.train
    info = init_distributed()
    engine = build_engine(m, validate_layout(cfg.parallel, m, 1), cfg.precision, info, seed=t.seed)
    opt = build_optimizer(engine.model_parts, cfg.optim, lr=cfg.lr.lr, device=engine.device)
    hf = _hf_model(cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                               weight_decay=cfg.optim.weight_decay, foreach=True)
    ds = SyntheticDataset(m.vocab_size, t.seq_length, steps * t.global_batch_size, cfg.data.num_ngrams,
                          cfg.data.ngram_length, t.seed)
    accum = t.global_batch_size // t.micro_batch_size
    cpu = torch.device("cpu")

    def hibari_step(step):
        opt.zero_grad(set_to_none=True)
        losses = [engine.forward_backward(tok, lab, loss_scale=1.0 / accum)
                  for tok, lab, _ in micro_batches(ds, step * t.global_batch_size, t.global_batch_size,
                                                   t.micro_batch_size, 0, 1, cpu)]
        engine.clip_grad_norm_(t.grad_clip)
        opt.step()
        return engine.dp_mean(torch.stack(losses).mean()).item()

    def hf_step(step):
        hf_opt.zero_grad(set_to_none=True)
        losses = []
        for tok, lab, _ in micro_batches(ds, step * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                         0, 1, cpu):
            logits = hf(input_ids=tok).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), lab.flatten())
            (loss / accum).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.grad_clip)
        hf_opt.step()
        return torch.stack(losses).mean().item()

    times = {"hibari": [], "hf": []}
    for step in range(steps):
        for name, fn in (("hibari", hibari_step), ("hf", hf_step)) if step % 2 == 0 else \
                (("hf", hf_step), ("hibari", hibari_step)):
            t0 = time.perf_counter()
            fn(step)
            times[name].append(time.perf_counter() - t0)
    tokens = t.global_batch_size * t.seq_length
    return (tokens / statistics.median(times["hibari"][skip:]), tokens / statistics.median(times["hf"][skip:]))


def layout_tokens_per_s(name: str, steps: int, skip: int, workdir: Path) -> float | None:
    from megatron_ext.train.metrics import read_metrics

    nproc, extra = LAYOUTS[name]
    run = workdir / f"layout-{name}"
    cmd = [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", str(nproc), str(TINY), f"run.dir={run}",
           *bench_overrides(steps), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"layout {name}: failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    recs = read_metrics(run)[skip:]
    return statistics.median(x["tokens_per_s"] for x in recs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    ap.add_argument("--layouts", default="", help="comma-separated: " + ",".join(LAYOUTS))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_cpu.md"))
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="hibari-bench-"))
    e2e, _ = hibari_tokens_per_s(args.steps, args.skip, work)
    print(f"hibari train (end to end): {e2e:,.0f} tok/s", flush=True)
    from hibari.config import load_config
    from megatron_ext.train.config import TrainConfig

    cfg = load_config(TrainConfig, TINY, ["run.dir=unused", *bench_overrides(args.steps)])
    ours, theirs = interleaved_steps(cfg, args.steps, args.skip)
    print(f"interleaved: hibari {ours:,.0f} tok/s, transformers {theirs:,.0f} tok/s", flush=True)
    layouts = {}
    for name in [x for x in args.layouts.split(",") if x]:
        layouts[name] = layout_tokens_per_s(name, args.steps, args.skip, work)
        print(f"layout {name}: {layouts[name]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    m, t = cfg.model, cfg.train
    cmd = "python bench/train_cpu.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training throughput on CPU: hibari vs transformers",
        "",
        f"- Machine: 2-core CI-class CPU (shared with other jobs while measured), {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{cmd.strip()}`",
        f"- Model: tiny Llama from configs/tiny.yaml (vocab {m.vocab_size}, dim {m.dim}, {m.n_layers} layers, "
        f"{m.n_heads} heads / {m.n_kv_heads} KV, ffn {m.ffn_hidden_dim}), fp32, global batch {t.global_batch_size} "
        f"x seq {t.seq_length}, micro batch {t.micro_batch_size} (grad accumulation "
        f"{t.global_batch_size // t.micro_batch_size}), AdamW + clip, synthetic n-gram data",
        f"- {args.steps} steps each, median step time after {args.skip} warm-up steps; the hibari and transformers "
        f"steps alternate one by one in one process (same load on both)",
        "",
        "| one process | tokens/s | vs transformers |",
        "|---|---:|---:|",
        f"| hibari step (Engine.forward_backward x grad-accum, clip, AdamW with decay mask) | {ours:,.0f} | "
        f"{ours / theirs:.2f}x |",
        f"| transformers LlamaForCausalLM + torch AdamW (baseline) | {theirs:,.0f} | 1.00x |",
        f"| `hibari train` end to end (separate run before; metrics.jsonl each step) | {e2e:,.0f} | "
        f"{e2e / theirs:.2f}x (not interleaved) |",
    ]
    if layouts:
        lines += ["", "| layout (`hibari launch local`, gloo) | processes | tokens/s (whole job) | vs 1proc |",
                  "|---|---:|---:|---:|"]
        base = layouts.get("1proc") or e2e
        for name, tps in layouts.items():
            nproc = LAYOUTS[name][0]
            lines.append(f"| {name} | {nproc} | " + (f"{tps:,.0f} | {tps / base:.2f}x |" if tps else
                                                     "failed | - |"))
        lines += ["", "Layouts run more processes than the machine has cores; the numbers show the gloo/launch "
                      "overhead on CPU, not a speed-up."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
