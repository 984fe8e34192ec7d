"""Multi-process side of tests/test_mixtral_parallel.py: Mixtral layouts (expert parallel, FSDP) trained for a few
steps in one gloo process group; every rank writes its results as JSON (the tests/parallel_worker.py pattern)."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch

import parallel  # noqa: F401  - preloaded by the forkserver together with this module
from parallel_worker import free_port

MIXTRAL_TINY = dict(arch="mixtral", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                    max_seq_len=64, n_experts=4, n_experts_per_tok=2, router_aux_loss_coef=0.1,
                    router_z_loss_coef=0.01)
SEQ, GLOBAL_BATCH, GRAD_ACCUM, STEPS, SEED, LR, MAX_NORM = 16, 8, 2, 5, 1234, 1e-2, 1.0


def mixtral_args(**overrides):
    from megatron_ext.models.llama import ModelArgs

    return ModelArgs(**{**MIXTRAL_TINY, **overrides})


def make_data(steps: int = STEPS):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, MIXTRAL_TINY["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def micro_batches(tokens: torch.Tensor, dp_rank: int, dp_size: int):
    """This dp rank's rows of a global batch, as GRAD_ACCUM micro-batches (tokens, labels)."""
    per_rank = tokens.shape[0] // dp_size
    mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    micro = per_rank // GRAD_ACCUM
    return [(mine[m * micro:(m + 1) * micro, :-1], mine[m * micro:(m + 1) * micro, 1:]) for m in range(GRAD_ACCUM)]


def train(engine, data, opt=None):
    """The trainer's step: one engine.forward_backward per micro-batch, clip, AdamW. Returns records, optimizer."""
    if opt is None:
        opt = torch.optim.AdamW(list(engine.parameters()), lr=LR, weight_decay=0.1, foreach=True)
    records = []
    for tokens in data:
        losses = [engine.forward_backward(t, lab, loss_scale=1.0 / GRAD_ACCUM, sync_grads=m == GRAD_ACCUM - 1)
                  for m, (t, lab) in enumerate(micro_batches(tokens, engine.dp_rank, engine.dp_size))]
        norm = float(engine.clip_grad_norm_(MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": float(engine.dp_mean(torch.stack(losses).mean())), "norm": norm,
                        **{k: v.tolist() for k, v in engine.model_metrics().items()}})
    return records, opt


def full_params(engine) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    from parallel.parallelize import strip_wrapper_prefixes

    return {strip_wrapper_prefixes(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for n, p in engine.named_parameters()}


def run_layouts(rank: int, world: int, port: int, layouts: list[dict], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp

    from megatron_ext.models.mixtral_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import ParallelConfig, destroy, init_distributed

    info = init_distributed("gloo")
    results = {}
    try:
        for layout in layouts:
            name = layout["name"]
            engine = build_engine(mixtral_args(**layout.get("model", {})), ParallelConfig(**layout["parallel"]),
                                  PrecisionConfig(recipe="fp32"), info, seed=SEED)
            res = {"all_dtensor": all(type(p).__name__ == "DTensor" for p in engine.parameters())}
            if layout.get("load"):  # a checkpoint of another layout: DCP reshards model and optimizer on load
                opt = torch.optim.AdamW(list(engine.parameters()), lr=LR, weight_decay=0.1, foreach=True)
                state = {"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)}
                dcp.load(state, checkpoint_id=str(Path(out_dir, f"ckpt_{layout['load']}")))
                engine.load_model_state_dict(state["model"])
                engine.load_optimizer_state_dict(opt, state["optimizer"])
                res["records"], _ = train(engine, make_data(2), opt)  # continue for two more steps
            else:
                res["records"], opt = train(engine, make_data())
                if layout.get("save"):
                    dcp.save({"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)},
                             checkpoint_id=str(Path(out_dir, f"ckpt_{name}")))
            params = full_params(engine)
            if rank == 0:
                torch.save(params, Path(out_dir, f"params_{name}.pt"))
            results[name] = res
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()


def launch(world: int, layouts: list[dict], out_dir) -> list[dict]:
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload([__name__])
    mp.start_processes(run_layouts, args=(world, free_port(), layouts, str(out_dir)), nprocs=world, join=True,
                       start_method="forkserver")
    out = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r} failed:\n{res['error']}" for r, res in enumerate(out) if "error" in res]
    if errors:
        raise AssertionError("\n".join(errors))
    return out
