"""Mixtral under the parallel engine vs one plain process, fp32, 5 AdamW steps (2 micro-batches, clipping):
expert parallel EP2 (= dp_shard 2), EP2 with a capacity factor, FSDP2 without EP, TP2 with and without sequence /
loss parallel, EP2 x FSDP2, FSDP2 x TP2, EP2 x TP2 and EP2 x HSDP 2x2 (4 ranks; EP2 x FSDP2: experts replicated
over 2 groups of 2; HSDP: over the 2 replicas), and DCP resharding of an EP2 checkpoint (model + optimizer) into
FSDP2, EP4 and one process, and of the EP2 x HSDP one into EP2 x FSDP4 and one process.

The reference is the plain `MixtralTransformer` in one process: for each dp shard and micro-batch, cross-entropy +
router losses of that micro-batch (the HF load-balancing loss is per forward, so per rank under data parallelism),
backward of their mean, global-norm clip, AdamW.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_ep_worker import (GRAD_ACCUM, LR, MAX_NORM, SEED, STEPS, launch, make_data, micro_batches,
                               mixtral_args)

pytestmark = pytest.mark.slow

TOL = 1e-5
LAYOUTS = [
    {"name": "ep2", "parallel": {"dp_shard": 2, "ep": 2}, "save": True},
    {"name": "ep2_capacity", "parallel": {"dp_shard": 2, "ep": 2}, "model": {"moe_capacity_factor": 1.0}},
    {"name": "fsdp2", "parallel": {"dp_shard": 2}},
    {"name": "tp2", "parallel": {"tp": 2}},  # sequence + loss parallel
    {"name": "tp2_no_sp", "parallel": {"tp": 2, "sequence_parallel": False, "loss_parallel": False}},
    {"name": "load_ep2_into_fsdp2", "parallel": {"dp_shard": 2}, "load": "ep2"},
]
LAYOUTS_4 = [{"name": "ep2_fsdp2", "parallel": {"dp_shard": 4, "ep": 2}},
             {"name": "fsdp2_tp2", "parallel": {"dp_shard": 2, "tp": 2}},
             {"name": "ep2_tp2", "parallel": {"dp_shard": 2, "tp": 2, "ep": 2}},
             {"name": "load_ep2_into_ep4", "parallel": {"dp_shard": 4, "ep": 4}, "load": "ep2"},
             # HSDP: experts Shard(0) over ep = dp_shard, replicated over dp_replicate, gradients averaged over all 4
             {"name": "hsdp2_ep2", "parallel": {"dp_replicate": 2, "dp_shard": 2, "ep": 2}, "save": True},
             {"name": "load_hsdp2_ep2_into_ep2", "parallel": {"dp_shard": 4, "ep": 2}, "load": "hsdp2_ep2"}]


def reference_run(model_overrides: dict, dp_size: int = 2, steps_data=None):
    """Plain model, one process; returns (per-step records, model, optimizer) after `steps_data` (default 5 steps),
    then optionally continues (see `continue_run`)."""
    from megatron_ext.models.mixtral import MixtralTransformer

    args = mixtral_args(**model_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MixtralTransformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)
    return continue_run(model, opt, make_data() if steps_data is None else steps_data, dp_size) + (model, opt)


def continue_run(model, opt, data, dp_size: int = 2):
    records = []
    for tokens in data:
        ces, auxes, load = [], [], 0
        for r in range(dp_size):
            for t, lab in micro_batches(tokens, r, dp_size):
                logits = model(t)
                ce = F.cross_entropy(logits.flatten(0, 1), lab.flatten())
                router = model.router_losses()
                ((ce + router.total) / (dp_size * GRAD_ACCUM)).backward()
                ces.append(ce.item())
                auxes.append(router.load_balancing.item())
                load = load + router.expert_load
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        records.append({"loss": sum(ces) / len(ces), "norm": norm, "aux_loss": sum(auxes) / len(auxes),
                        "expert_load": load.int().tolist()})
    return (records,)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mixtral_parallel")


@pytest.fixture(scope="module")
def results(workdir):
    return launch(2, LAYOUTS, workdir)


@pytest.fixture(scope="module")
def results_4(workdir, results):
    return launch(4, LAYOUTS_4, workdir)  # after the 2-rank launch: it loads that launch's EP2 checkpoint


def _assert_records_match(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= TOL
        assert g["norm"] == pytest.approx(w["norm"], rel=1e-4)
        assert abs(g["aux_loss"] - w["aux_loss"]) <= TOL
        assert g["expert_load"] == w["expert_load"]


@pytest.mark.parametrize("world, name", [(2, "ep2"), (2, "ep2_capacity"), (2, "fsdp2"), (2, "tp2"), (2, "tp2_no_sp"),
                                         (4, "ep2_fsdp2"), (4, "fsdp2_tp2"), (4, "ep2_tp2"), (4, "hsdp2_ep2")])
def test_layout_matches_one_process(request, workdir, world, name):
    layout = next(lay for lay in LAYOUTS + LAYOUTS_4 if lay["name"] == name)
    # tensor parallel ranks share their data: the reference splits the batch over the dp ranks only
    dp_size = layout["parallel"].get("dp_shard", 1) * layout["parallel"].get("dp_replicate", 1)
    want, model, _ = reference_run(layout.get("model", {}), dp_size=dp_size)
    per_rank = [r[name] for r in request.getfixturevalue("results" if world == 2 else "results_4")]
    assert all(r["records"] == per_rank[0]["records"] for r in per_rank)  # logged values agree on every rank
    assert len(per_rank[0]["records"]) == STEPS
    _assert_records_match(per_rank[0]["records"], want)
    assert all(r["all_dtensor"] for r in per_rank)  # FSDP/EP shards: one tensor type for clipping and AdamW
    params = torch.load(workdir / f"params_{name}.pt", weights_only=True)
    ref_params = dict(model.named_parameters())
    assert set(params) == set(ref_params)
    diff = max((params[k] - ref_params[k].detach()).abs().max().item() for k in params)
    # Adam divides by sqrt(v): parameters whose gradients are ~0 (rarely routed experts) turn 1e-7 gradient noise
    # into visible steps, so the weights are held to 5% of one lr step rather than to the loss tolerance
    assert diff <= 0.05 * LR, f"{name}: params differ from one process by {diff}"


def _resume_in_one_process(workdir, name: str, dp_size: int) -> list[dict]:
    """Load checkpoint `name` (model + optimizer) into one process, check the weights are those the saving run
    ended with, and train two more steps; one process = one dp rank fed all dp shards' micro-batches."""
    import torch.distributed.checkpoint as dcp

    from megatron_ext.models.mixtral_parallel import build_engine
    from megatron_ext.precision.config import PrecisionConfig
    from parallel import DistInfo, ParallelConfig

    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    engine = build_engine(mixtral_args(), ParallelConfig(), PrecisionConfig(recipe="fp32"), one, seed=0)
    eng_opt = torch.optim.AdamW(list(engine.parameters()), lr=LR, weight_decay=0.1, foreach=True)
    state = {"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(eng_opt)}
    dcp.load(state, checkpoint_id=str(workdir / f"ckpt_{name}"))
    engine.load_model_state_dict(state["model"])
    engine.load_optimizer_state_dict(eng_opt, state["optimizer"])
    saved = torch.load(workdir / f"params_{name}.pt", weights_only=True)
    for pname, p in engine.named_parameters():
        assert torch.equal(p.detach(), saved[pname]), pname
    records = []
    for tokens in make_data(2):
        micro = [mb for r in range(dp_size) for mb in micro_batches(tokens, r, dp_size)]
        losses = [engine.forward_backward(t, lab, loss_scale=1.0 / len(micro)) for t, lab in micro]
        norm = float(engine.clip_grad_norm_(MAX_NORM))
        eng_opt.step()
        eng_opt.zero_grad(set_to_none=True)
        records.append({"loss": float(torch.stack(losses).mean()), "norm": norm,
                        **{k: v.tolist() for k, v in engine.model_metrics().items()}})
    return records


def test_ep2_checkpoint_resumes_in_fsdp2_and_one_process(results, workdir):
    """Saved under EP2 (experts sharded by expert), loaded under FSDP2 (sharded by row) and in one process: the
    next two steps match the reference continuing from its own state (so the optimizer state came along)."""
    _, model, opt = reference_run({})
    (want,) = continue_run(model, opt, make_data(2))
    _assert_records_match([r["load_ep2_into_fsdp2"] for r in results][0]["records"], want)

    _assert_records_match(_resume_in_one_process(workdir, "ep2", dp_size=2), want)


def test_ep2_checkpoint_resumes_in_ep4(results_4):
    """Saved with 2 experts per rank, loaded with 1 per rank on 4 ranks: the next two steps match the reference
    continuing from its own state with 4 data-parallel shards."""
    _, model, opt = reference_run({})
    (want,) = continue_run(model, opt, make_data(2), dp_size=4)
    per_rank = [r["load_ep2_into_ep4"] for r in results_4]
    assert all(r["records"] == per_rank[0]["records"] for r in per_rank)
    _assert_records_match(per_rank[0]["records"], want)


def test_hsdp2_ep2_checkpoint_resumes_in_ep2_and_one_process(results_4, workdir):
    """Saved under EP2 x HSDP 2x2 (experts Shard(0) over ep, Replicate over dp_replicate), loaded under EP2 x FSDP4
    (dp_replicate 1: experts replicated over 2 dp_shard groups) and in one process: the next two steps match the
    reference continuing from its own state with 4 data-parallel shards."""
    _, model, opt = reference_run({}, dp_size=4)
    (want,) = continue_run(model, opt, make_data(2), dp_size=4)
    per_rank = [r["load_hsdp2_ep2_into_ep2"] for r in results_4]
    assert all(r["records"] == per_rank[0]["records"] for r in per_rank)
    _assert_records_match(per_rank[0]["records"], want)
    _assert_records_match(_resume_in_one_process(workdir, "hsdp2_ep2", dp_size=4), want)
