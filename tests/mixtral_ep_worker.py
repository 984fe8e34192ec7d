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



def _rank_env(rank: int, world: int, port: int) -> None:
    """The torchrun-style environment of one spawned rank (one CPU thread each: the ranks share 2 cores)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn_ranks(target, world: int, payload, out_dir, deadline_s: float | None = None) -> list[dict]:
    """Run target(rank, world, port, payload, out_dir) on `world` ranks; each writes rank{r}.json (an "error" key
    holds a rank's traceback). Returns the per-rank results, or raises with every failed rank's traceback. With
    `deadline_s`, ranks still running then are terminated and the launch raises: a hung collective fails the test
    instead of stalling the suite."""
    import multiprocessing
    import time

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload([__name__])
    ctx = mp.start_processes(target, args=(world, free_port(), payload, str(out_dir)), nprocs=world, join=False,
                             start_method="forkserver")
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while not ctx.join(timeout=None if end is None else max(end - time.monotonic(), 0.1)):
        if end is not None and time.monotonic() >= end:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            raise AssertionError(f"ranks {alive} still running after {deadline_s:.0f} s (a collective hung)")
    out = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r} failed:\n{res['error']}" for r, res in enumerate(out) if "error" in res]
    if errors:
        raise AssertionError("\n".join(errors))
    return out


def run_layouts(rank: int, world: int, port: int, layouts: list[dict], out_dir: str) -> None:
    _rank_env(rank, world, port)
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
    return spawn_ranks(run_layouts, world, layouts, out_dir)


# ------------------------------------------------------------------ pipeline parallel (tests/test_mixtral_pp.py)
def train_step(engine, data):
    """The trainer's path: all of a step's micro-batches in one engine.forward_backward_step, clip, AdamW."""
    opt = torch.optim.AdamW(list(engine.parameters()), lr=LR, weight_decay=0.1, foreach=True)
    records = []
    for tokens in data:
        loss = engine.forward_backward_step([(t, lab, None) for t, lab in
                                             micro_batches(tokens, engine.dp_rank, engine.dp_size)])
        norm = float(engine.clip_grad_norm_(MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": float(engine.dp_mean(loss)), "norm": norm,
                        **{k: v.tolist() for k, v in engine.model_metrics().items()}})
    return records, opt


def run_pipeline_layouts(rank: int, world: int, port: int, layouts: list[dict], out_dir: str) -> None:
    """Each layout: 5 steps (layout["step"]: through forward_backward_step, else one forward_backward per
    micro-batch), a validation loss after them, and this rank's parameters (a pp rank holds only its stages)."""
    _rank_env(rank, world, port)
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
            records, _ = (train_step if layout.get("step") else train)(engine, make_data())
            val = make_data(STEPS + 1)[-1]  # a batch no step trained on
            val_loss = float(engine.forward_loss(val[:, :-1], val[:, 1:]))
            results[name] = {"records": records, "val_loss": val_loss}
            torch.save(full_params(engine), Path(out_dir, f"params_{name}_rank{rank}.pt"))
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()


def launch_pipeline(world: int, layouts: list[dict], out_dir) -> list[dict]:
    return spawn_ranks(run_pipeline_layouts, world, layouts, out_dir)


# ------------------------------------------------------------------ quantized experts (tests/test_precision_moe.py)
def run_quantized_experts(rank: int, world: int, port: int, recipe: str, out_dir: str) -> None:
    """One block's experts under `recipe` (stochastic rounding on): EP over all ranks, each rank with its own
    tokens, vs the same experts in this process without EP on all ranks' tokens (per expert: rank 0's rows, then
    rank 1's, as the all-to-all delivers them). Writes the max |difference| of outputs and gradients."""
    _rank_env(rank, world, port)
    import copy

    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_ext.models.mixtral import MixtralTransformer, grouped_linear
    from megatron_ext.precision import PrecisionConfig, apply_precision, set_step_context
    from parallel import destroy, init_distributed
    from parallel.ep import apply_expert_parallel

    init_distributed("gloo")
    results = {}
    try:
        torch.manual_seed(SEED)
        args = mixtral_args(n_layers=1)
        model = MixtralTransformer(args)
        model.init_weights()
        apply_precision(model, PrecisionConfig(recipe=recipe, bf16_first_layers=0, bf16_last_layers=0))
        single = model.layers["0"].feed_forward.experts
        sharded = copy.deepcopy(single)
        g = torch.Generator().manual_seed(11)
        xs, dys, sizes = [], [], []
        for _ in range(world):  # every rank's tokens, sorted by expert (expert 3 gets none)
            ids = torch.sort(torch.randint(0, args.n_experts - 1, (24,), generator=g)).values
            xs.append(torch.randn(24, args.dim, generator=g))
            dys.append(torch.randn(24, args.dim, generator=g))
            sizes.append(torch.bincount(ids, minlength=args.n_experts))
        # one process: expert e's rows = rank 0's group e, then rank 1's, ...
        starts = [torch.cumsum(s, 0) - s for s in sizes]
        rows = [[(r, int(starts[r][e]), int(sizes[r][e])) for r in range(world)] for e in range(args.n_experts)]
        x_all = torch.cat([xs[r][a:a + n] for groups in rows for r, a, n in groups]).requires_grad_(True)
        dy_all = torch.cat([dys[r][a:a + n] for groups in rows for r, a, n in groups])
        set_step_context(single, step=5, micro_batch=1, dp_rank=0)
        y_all = single(x_all, torch.stack(sizes).sum(0))
        (y_all * dy_all).sum().backward()
        mine, at = [], 0  # this rank's rows inside the one-process batch
        for groups in rows:
            for r, _, n in groups:
                if r == rank:
                    mine += range(at, at + n)
                at += n
        mine = torch.tensor(mine)

        apply_expert_parallel(sharded, init_device_mesh("cpu", (world,)), 0)
        set_step_context(sharded, step=5, micro_batch=1, dp_rank=rank)
        x = xs[rank].clone().requires_grad_(True)
        y = sharded(x, sizes[rank])
        (y * dys[rank]).sum().backward()
        diff = {"y": (y - y_all[mine]).abs().max().item(), "dx": (x.grad - x_all.grad[mine]).abs().max().item()}
        for w in ("w1", "w2", "w3"):  # EP averages expert gradients over the dp ranks: x world = the sum
            got = getattr(sharded, w).grad.full_tensor() * world
            diff[f"d{w}"] = (got - getattr(single, w).grad).abs().max().item()
        w1, w2, w3 = (getattr(single, w).detach() for w in ("w1", "w2", "w3"))
        total = torch.stack(sizes).sum(0)
        ref = grouped_linear(F.silu(grouped_linear(x_all.detach(), w1, total)) * grouped_linear(
            x_all.detach(), w3, total), w2, total)
        diff["quantized_vs_fp32"] = ((y_all - ref).norm() / ref.norm()).item()
        results[recipe] = diff
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()


def launch_quantized_experts(world: int, recipe: str, out_dir) -> list[dict]:
    return spawn_ranks(run_quantized_experts, world, recipe, out_dir)


# ------------------------------------------------------------ collapsed routing (tests/test_mixtral_ep_empty.py)
def zero_routers(named_parameters) -> int:
    """Zero every router weight (every logit ties: top-k then picks the same k experts for every token, whatever
    the hidden state). Run before each step: the routers still get gradients and AdamW moves them. Returns the count."""
    n = 0
    with torch.no_grad():
        for name, p in named_parameters:
            if name.endswith("router.weight"):
                p.zero_()
                n += 1
    return n


def run_collapsed_routing(rank: int, world: int, port: int, layouts: list[dict], out_dir: str) -> None:
    """Each layout: EP training steps with the routers zeroed before every step, so all tokens go to the experts
    of one rank and the other receives none (its experts run on empty inputs); a 1-minute collective timeout turns
    a rank missing from a collective into an error instead of a hang."""
    _rank_env(rank, world, port)
    from megatron_ext.models.mixtral_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import ParallelConfig, destroy, init_distributed

    info = init_distributed("gloo", timeout_minutes=1)
    results = {}
    try:
        for layout in layouts:
            engine = build_engine(mixtral_args(), ParallelConfig(**layout["parallel"], timeout_minutes=1),
                                  PrecisionConfig(**layout.get("precision", {"recipe": "fp32"})), info, seed=SEED)
            records, opt = [], None
            for tokens in make_data(layout["steps"]):
                assert zero_routers(engine.named_parameters()) == MIXTRAL_TINY["n_layers"]
                step, opt = train(engine, [tokens], opt)
                records += step
            results[layout["name"]] = {"records": records}
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()
