"""Multi-process side of tests/test_precision_moe.py's data-parallel fp8_delayed test: one block's experts under
fp8_delayed on 2 gloo ranks (no expert parallel), each with its own tokens, vs the same experts in one process on all
ranks' tokens. Every rank writes its results as JSON (the tests/mixtral_ep_worker.py pattern)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch

from mixtral_ep_worker import SEED, _rank_env, spawn_ranks, mixtral_args

# group sizes per step and rank: expert 2 gets no token anywhere (its history must not move); experts 1 and 3 get
# tokens on one rank only (the other must record the same amaxes); the ranks' activation ranges differ per step
SIZES = (([6, 0, 0, 10], [3, 5, 0, 0]), ([0, 4, 0, 8], [7, 0, 0, 9]), ([5, 5, 0, 5], [0, 0, 0, 16]))
GAINS = ((1.0, 3.0), (2.0, 0.5), (0.25, 1.0))


def run_dp_delayed_experts(rank: int, world: int, port: int, length: int, out_dir: str) -> None:
    _rank_env(rank, world, port)
    import copy

    import torch.distributed as dist

    from megatron_ext.models.mixtral import MixtralTransformer
    from megatron_ext.precision import PrecisionConfig, apply_precision, set_step_context
    from parallel import destroy, init_distributed

    init_distributed("gloo")
    results = {}
    try:
        torch.manual_seed(SEED)
        model = MixtralTransformer(mixtral_args(n_layers=1))
        model.init_weights()
        apply_precision(model, PrecisionConfig(recipe="fp8_delayed", amax_history_len=length, bf16_first_layers=0,
                                               bf16_last_layers=0))
        single = model.layers["0"].feed_forward.experts
        dp = copy.deepcopy(single)
        g = torch.Generator().manual_seed(7)
        errors = {"y": 0.0, "dx": 0.0, "dw": 0.0}
        for step, (sizes, gains) in enumerate(zip(SIZES, GAINS)):
            xs = [torch.randn(sum(s), 64, generator=g) * a for s, a in zip(sizes, gains)]
            dys = [torch.randn(sum(s), 64, generator=g) * a for s, a in zip(sizes, gains)]
            starts = [[sum(s[:e]) for e in range(4)] for s in sizes]
            order = [(r, starts[r][e], sizes[r][e]) for e in range(4) for r in range(world)]  # by expert, then rank
            x_all = torch.cat([xs[r][a:a + n] for r, a, n in order]).requires_grad_(True)
            dy_all = torch.cat([dys[r][a:a + n] for r, a, n in order])
            single.zero_grad(set_to_none=True)
            set_step_context(single, step=step)
            y_all = single(x_all, torch.tensor(sizes).sum(0))
            (y_all * dy_all).sum().backward()
            mine, at = [], 0
            for r, _, n in order:
                if r == rank:
                    mine += range(at, at + n)
                at += n
            dp.zero_grad(set_to_none=True)
            set_step_context(dp, step=step, dp_rank=rank, dp_group=dist.group.WORLD)
            x = xs[rank].clone().requires_grad_(True)
            y = dp(x, torch.tensor(sizes[rank]))
            (y * dys[rank]).sum().backward()

            def rel(a, b):
                return ((a - b).norm() / b.norm()).item()

            errors["y"] = max(errors["y"], rel(y.detach(), y_all.detach()[mine]))
            errors["dx"] = max(errors["dx"], rel(x.grad, x_all.grad[mine]))
            for w in ("w1", "w3", "w2"):  # the ranks' gradients sum to the one-process one
                grad = getattr(dp, w).grad.clone()
                dist.all_reduce(grad)
                errors["dw"] = max(errors["dw"], rel(grad, getattr(single, w).grad))
        results = {"errors": errors, "history": dp.amax_history.tolist(), "count": dp.amax_count.tolist(),
                   "single_history": single.amax_history.tolist(), "single_count": single.amax_count.tolist()}
    except Exception:  # noqa: BLE001 - reported to the test through the results file
        results["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        destroy()


def launch_dp_delayed_experts(out_dir, length: int = 2) -> list[dict]:
    return spawn_ranks(run_dp_delayed_experts, 2, length, out_dir, deadline_s=120)
