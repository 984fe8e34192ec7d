"""Multi-process side of tests/test_parallel*.py: one process-group launch runs many layouts (launches are the
expensive part on a 2-core CI machine). Spawned with torch.multiprocessing; every rank writes its results as JSON."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import torch

import parallel  # noqa: F401  - preloaded by the forkserver together with this module
from megatron_ext.precision.config import PrecisionConfig  # noqa: F401

TINY = dict(vocab_size=128, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, max_seq_len=64)
SEQ = 16
GLOBAL_BATCH = 8
GRAD_ACCUM = 2
STEPS = 5
MAX_NORM = 1.0
SEED = 1234
LR = 1e-2
BF16_LR = 1e-3  # bf16 runs: small steps so rounding noise is not amplified by Adam into divergence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(**overrides):
    from megatron_ext.models.llama import ModelArgs

    return ModelArgs(**{**TINY, **overrides})


def make_data(steps: int = STEPS, batch: int = GLOBAL_BATCH, seq: int = SEQ, vocab: int = TINY["vocab_size"]):
    """Per step: tokens [batch, seq+1] and document ids (odd steps pack 2-3 documents per row, even steps none)."""
    g = torch.Generator().manual_seed(99)
    out = []
    for step in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        docs = None
        if step % 2:
            cuts = torch.randint(0, 3, (batch, seq + 1), generator=g) == 0
            docs = torch.cumsum(cuts.int(), dim=1).to(torch.int32)
        out.append((tokens, docs))
    return out


def train_run(engine, data, grad_accum: int = GRAD_ACCUM, max_norm: float = MAX_NORM, lr: float = LR, opt=None,
              per_micro_step: bool = False):
    """AdamW steps over `data` with this engine's dp slice; returns ({dp-mean losses, grad norms, eval loss}, opt).

    Gradients of one step come from `engine.forward_backward_step` over its micro-batches (what the trainer
    calls), or with `per_micro_step` from one `engine.forward_backward` per micro-batch.
    """
    if opt is None:
        opt = torch.optim.AdamW(list(engine.parameters()), lr=lr, weight_decay=0.1, foreach=True)
    losses, norms, evals = [], [], []
    for step, (tokens, docs) in enumerate(data):
        if step == 2:  # validation between training steps (pipeline and FSDP state must survive it)
            evals.append(_eval(engine, data[1]))
        per_rank = tokens.shape[0] // engine.dp_size
        rows = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
        tok, doc = tokens[rows], None if docs is None else docs[rows]
        micro = per_rank // grad_accum
        batches = [(tok[r, :-1], tok[r, 1:], None if doc is None else doc[r, :-1])
                   for r in (slice(m * micro, (m + 1) * micro) for m in range(grad_accum))]
        if per_micro_step:
            step_loss = 0.0
            for m, (t, lab, d) in enumerate(batches):
                loss = engine.forward_backward(t, lab, d, loss_scale=1.0 / grad_accum, sync_grads=m == grad_accum - 1)
                step_loss += float(engine.dp_mean(loss)) / grad_accum
        else:
            step_loss = float(engine.dp_mean(engine.forward_backward_step(batches)))
        norms.append(float(engine.clip_grad_norm_(max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    evals.append(_eval(engine, data[0]))
    return {"losses": losses, "norms": norms, "eval": evals[-1], "evals": evals}, opt


def _eval(engine, batch) -> float:
    tokens, docs = batch
    per_rank = tokens.shape[0] // engine.dp_size
    rows = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    doc = None if docs is None else docs[rows, :-1]
    engine.set_train(False)
    loss = engine.forward_loss(tokens[rows, :-1], tokens[rows, 1:], doc)
    engine.set_train(True)
    return float(engine.dp_mean(loss))


def full_params(engine) -> dict[str, torch.Tensor]:
    """Unsharded copy of this rank's parameters (hibari names)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
            for name, p in engine.named_parameters()}


def gather_full_params(engine) -> dict[str, torch.Tensor]:
    """All parameters, unsharded, from every pipeline stage (collective; every rank gets the full dict)."""
    import torch.distributed as dist

    mine = full_params(engine)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for d in everyone:
        merged.update(d)
    return merged


def load_and_compare(engine, ckpt: Path, params_file: Path) -> dict:
    """Load model + optimizer state from a DCP checkpoint of another layout; report how far params are off."""
    import torch.distributed.checkpoint as dcp

    opt = torch.optim.AdamW(list(engine.parameters()), lr=1e-2, weight_decay=0.1, foreach=True)
    state = {"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)}
    dcp.load(state, checkpoint_id=str(ckpt))
    engine.load_model_state_dict(state["model"])
    engine.load_optimizer_state_dict(opt, state["optimizer"])
    expected = torch.load(params_file, weights_only=True)
    mine = full_params(engine)
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    return {"max_param_diff": max((mine[k] - expected[k]).abs().max().item() for k in mine),
            "n_params": len(mine), "optimizer_steps": sorted(steps)}


def comm_counts_tp(engine, tokens) -> dict:
    """Collectives per block (forward and backward) and in total, recorded by CommDebugMode."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
    per_module = {}
    for fqn, counts in mode.comm_module_counts.items():
        per_module[fqn] = {phase: {str(op).split(".")[-1] if "." in str(op) else str(op): n
                                   for op, n in counts[phase].items()} for phase in ("forward", "backward")}
    total = {str(op): n for op, n in mode.get_comm_counts().items()}
    return {"per_module": per_module, "total": total}


def free_slurm_port() -> int:
    """A free port that parallel.dist derives from some SLURM job id (15000 + job id % 20000)."""
    import random

    from hibari.env import SLURM_PORT_BASE, SLURM_PORT_SPAN

    rng = random.Random(os.getpid())
    for _ in range(100):
        port = SLURM_PORT_BASE + rng.randrange(SLURM_PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def run_layouts(rank: int, world: int, port: int, layouts: list[dict], out_dir: str, env_style: str) -> None:
    """Entry point of every spawned rank: builds each layout in turn, trains, records."""
    if env_style == "slurm":  # what srun sets: parallel.dist must find rank, world and the master from it
        from hibari.env import SLURM_PORT_BASE

        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
        os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                          SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(port - SLURM_PORT_BASE + 20000 * 7))
    else:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_ext.precision.config import PrecisionConfig
    from megatron_ext.models.llama_parallel import build_engine
    from parallel import ParallelConfig, destroy, init_distributed

    info = init_distributed("gloo")
    schedule_steps = _count_schedule_steps()
    results = {"_init": {"rank": info.rank, "world_size": info.world_size, "backend": info.backend,
                         "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"}}
    data = make_data()
    try:
        for layout in layouts:
            name, cfg = layout["name"], ParallelConfig(**layout["parallel"])
            prec = PrecisionConfig(recipe=layout.get("precision", "fp32"))
            engine = build_engine(tiny_args(**layout.get("model", {})), cfg, prec, info, seed=SEED)
            res = {"dp_rank": engine.dp_rank, "pp_rank": engine.pp_rank, "tp_rank": engine.tp_rank,
                   "all_dtensor": all(type(p).__name__ == "DTensor" for p in engine.parameters())}
            if layout.get("load"):  # a checkpoint another layout wrote: DCP reshards on load
                res["load"] = load_and_compare(engine, Path(out_dir, f"ckpt_{layout['load']}"),
                                               Path(out_dir, f"params_{layout['load']}.pt"))
                results[name] = res
                continue
            if layout.get("probe_grad_sync"):  # where do gradients live after a non-final micro-step?
                tokens = data[0][0][:2]
                engine.forward_backward(tokens[:, :-1], tokens[:, 1:], loss_scale=0.5, sync_grads=False)
                res["reduced_after_micro_step"] = all(p.grad is not None for p in engine.parameters())
                engine = build_engine(tiny_args(**layout.get("model", {})), cfg, prec, info, seed=SEED)
            if layout.get("comm_counts"):
                res["comm"] = comm_counts_tp(engine, data[0][0][:2])
                engine = build_engine(tiny_args(**layout.get("model", {})), cfg, prec, info, seed=SEED)
            schedule_steps[0] = 0
            run, opt = train_run(engine, data, lr=layout.get("lr", LR),
                                 per_micro_step=layout.get("per_micro_step", False))
            res.update(run)
            res["schedule_steps"] = schedule_steps[0]
            if layout.get("save"):
                import torch.distributed.checkpoint as dcp

                path = Path(out_dir, f"ckpt_{name}")
                dcp.save({"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)},
                         checkpoint_id=str(path))
                params = gather_full_params(engine)
                if rank == 0:
                    torch.save(params, Path(out_dir, f"params_{name}.pt"))
            results[name] = res
            print(f"[rank {rank}] layout {name}: ok", flush=True)
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()


def _count_schedule_steps() -> list[int]:
    """Count pipeline schedule steps (one per pipeline flush) of every schedule the engine builds."""
    import parallel.engine

    counter = [0]
    build = parallel.engine.build_schedule

    def counting_build(*args, **kwargs):
        stages, schedule = build(*args, **kwargs)
        step = schedule.step

        def counted_step(*a, **kw):
            counter[0] += 1
            return step(*a, **kw)

        schedule.step = counted_step
        return stages, schedule

    parallel.engine.build_schedule = counting_build
    return counter


def launch(world: int, layouts: list[dict], out_dir: str | Path, env_style: str = "torchrun") -> list[dict]:
    """Start `world` gloo ranks running `layouts`; returns every rank's results.

    forkserver with this module preloaded: torch is imported once per test session instead of once per rank
    (on 2 cores, 8 ranks importing torch side by side cost more than the training itself).
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload([__name__])
    port = free_slurm_port() if env_style == "slurm" else free_port()
    mp.start_processes(run_layouts, args=(world, port, layouts, str(out_dir), env_style), nprocs=world, join=True,
                       start_method="forkserver")
    out = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r} failed:\n{res['error']}" for r, res in enumerate(out) if "error" in res]
    if errors:
        raise AssertionError("\n".join(errors))
    return out
