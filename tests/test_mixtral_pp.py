"""Mixtral under pipeline parallelism vs one plain process, fp32, 5 AdamW steps (clipping, aux and z losses on).

Under PP the HF load-balancing loss is that of each pipeline micro-batch's forward over all blocks (the stages pass
their router sums along, megatron_ext/models/mixtral_parallel.py). Every layout here runs pipeline micro-batches of
the same rows as the reference's forwards (`reference_run` with dp_size rows-groups), so the one-process reference
is: per forward, cross-entropy + router losses, backward of their mean, global-norm clip, AdamW.

Layouts: PP2 1F1B with 4 micro-batches per schedule step (> stages), PP2 GPipe with z-loss off through
`forward_backward_step` (the trainer's path: the step's micro-batches folded into one schedule step), interleaved
1F1B and ZBV (2 stages per rank, 4 blocks), PP2 x EP2 (4 ranks: dp_shard 2 = ep 2, pp 2) and PP2 x TP2 (sequence and loss
parallel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_ep_worker import STEPS, launch_pipeline, make_data
from test_mixtral_parallel import TOL, _assert_records_match, reference_run

pytestmark = pytest.mark.slow

# rows per pipeline micro-batch = GLOBAL_BATCH / ref_dp_size (the reference's forwards)
LAYOUTS = [
    {"name": "pp2_1f1b", "parallel": {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}, "ref_dp": 4},
    {"name": "pp2_gpipe_step", "parallel": {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 2}, "step": True,
     "model": {"router_z_loss_coef": 0.0}, "ref_dp": 2},
    {"name": "pp2_interleaved", "parallel": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2,
                                             "pp_microbatches": 4}, "model": {"n_layers": 4}, "ref_dp": 4},
    {"name": "pp2_zbv", "parallel": {"pp": 2, "pp_schedule": "zbv", "pp_stages_per_rank": 2, "pp_microbatches": 4},
     "model": {"n_layers": 4}, "ref_dp": 4},  # V placement, split input / weight backward
]
LAYOUTS_4 = [{"name": "pp2_ep2", "parallel": {"pp": 2, "dp_shard": 2, "ep": 2, "pp_microbatches": 2},
              "ref_dp": 4},
             # sequence + loss parallel: the carry passes the stage's sequence-parallel hooks as a plain tensor
             {"name": "pp2_tp2", "parallel": {"pp": 2, "tp": 2, "pp_microbatches": 4}, "ref_dp": 4}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mixtral_pp")


@pytest.fixture(scope="module")
def results(workdir):
    return launch_pipeline(2, LAYOUTS, workdir)


@pytest.fixture(scope="module")
def results_4(workdir, results):
    return launch_pipeline(4, LAYOUTS_4, workdir)


@pytest.mark.parametrize("world, name", [(2, "pp2_1f1b"), (2, "pp2_gpipe_step"), (2, "pp2_interleaved"),
                                         (2, "pp2_zbv"), (4, "pp2_ep2"), (4, "pp2_tp2")])
def test_pipeline_matches_one_process(request, workdir, world, name):
    layout = next(lay for lay in LAYOUTS + LAYOUTS_4 if lay["name"] == name)
    want, model, _ = reference_run(layout.get("model", {}), dp_size=layout["ref_dp"])
    per_rank = [r[name] for r in request.getfixturevalue("results" if world == 2 else "results_4")]
    # loss, aux_loss, z_loss and expert load reach every rank (only the last stage computes them)
    assert all(r["records"] == per_rank[0]["records"] for r in per_rank)
    got = per_rank[0]["records"]
    assert len(got) == STEPS
    _assert_records_match(got, want)
    for r in got:
        assert r["z_loss"] > 0 and len(r["expert_load"]) == model.args.n_layers

    val = make_data(STEPS + 1)[-1]
    with torch.no_grad():
        want_val = F.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[:, 1:].flatten()).item()
    assert all(abs(r["val_loss"] - want_val) <= TOL for r in per_rank)  # forward_only carries the router sums too

    params = {}
    for rank in range(world):
        params.update(torch.load(workdir / f"params_{name}_rank{rank}.pt", weights_only=True))
    ref_params = dict(model.named_parameters())
    assert set(params) == set(ref_params)
    diff = max((params[k] - ref_params[k].detach()).abs().max().item() for k in params)
    assert diff <= 0.05 * 1e-2, f"{name}: params differ from one process by {diff}"  # as test_mixtral_parallel


def test_stage_carry_gives_the_one_process_router_losses():
    """The carry of two half-models run one after the other gives the router losses (value and router gradients)
    of the whole model's forward; the pure functions, without processes."""
    from megatron_ext.models.mixtral import MixtralTransformer, router_losses_from_carry
    from mixtral_ep_worker import mixtral_args

    args = mixtral_args(n_layers=4)
    torch.manual_seed(0)
    whole = MixtralTransformer(args)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    whole(tokens)
    want = whole.router_losses()
    want_grads = torch.autograd.grad(want.total, [b.feed_forward.router.weight for b in whole.layers.values()])

    first, second = MixtralTransformer(args), MixtralTransformer(args)
    for part in (first, second):
        part.load_state_dict(whole.state_dict())
        part.pipeline_carry = True
    for key in ("2", "3"):
        del first.layers[key]
    for key in ("0", "1"):
        del second.layers[key]
    first.norm = first.output = None
    second.tok_embeddings = None
    hidden, carry = first(tokens)
    logits, carry = second(hidden, carry)
    got = router_losses_from_carry(carry, args)
    routers = [b.feed_forward.router.weight for part in (first, second) for b in part.layers.values()]
    got_grads = torch.autograd.grad(got.total, routers)
    torch.testing.assert_close(logits, whole(tokens), rtol=0, atol=1e-6)
    assert abs(got.load_balancing.item() - want.load_balancing.item()) <= 1e-6
    assert abs(got.z_loss.item() - want.z_loss.item()) <= 1e-6
    assert torch.equal(got.expert_load, want.expert_load)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
