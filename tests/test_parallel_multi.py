"""Multi-process parity of every parallel layout against one process (gloo on CPU).

Each launch runs many layouts in one process group (launches dominate the cost on 2 cores): 2 ranks (TP/SP, FSDP2,
PP with every schedule, bf16), 4 ranks (DP x TP, PP x TP, HSDP, PP x FSDP with ZBV, checkpoint resharding), 8 ranks
(DP x PP x TP). Every layout trains 5 AdamW steps (2 grad-accumulation micro-steps, clipping at 1.0, document
masks on odd steps) from the same seeded weights as the reference.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.models.llama_parallel import build_engine
from parallel import DistInfo, ParallelConfig
from parallel_worker import BF16_LR, GRAD_ACCUM, LR, SEED, STEPS, launch, make_data, tiny_args, train_run

pytestmark = pytest.mark.slow

FP32_TOL, BF16_TOL = 1e-5, 3e-3
PP2 = {"pp": 2, "pp_microbatches": 2}

LAYOUTS_2 = [
    {"name": "tp2", "parallel": {"tp": 2}, "comm_counts": True, "save": True},
    {"name": "tp2_no_sp_no_loss_parallel", "parallel": {"tp": 2, "sequence_parallel": False,
                                                        "loss_parallel": False}},
    {"name": "fsdp2_ac_full", "parallel": {"dp_shard": 2, "activation_checkpoint": "full"}, "probe_grad_sync": True},
    {"name": "fsdp2_no_sync", "parallel": {"dp_shard": 2, "fsdp_no_sync_accumulation": True},
     "probe_grad_sync": True},
    {"name": "pp2_gpipe", "parallel": {**PP2, "pp_schedule": "gpipe"}},
    {"name": "pp2_1f1b", "parallel": {**PP2, "pp_schedule": "1f1b"}},
    {"name": "pp2_1f1b_per_micro_step", "parallel": {**PP2, "pp_schedule": "1f1b"}, "per_micro_step": True},
    {"name": "pp2_interleaved_1f1b", "parallel": {"pp": 2, "pp_schedule": "interleaved_1f1b",
                                                  "pp_stages_per_rank": 2}},
    {"name": "pp2_interleaved_zb", "parallel": {"pp": 2, "pp_schedule": "interleaved_zb", "pp_stages_per_rank": 2}},
    {"name": "pp2_zbv", "parallel": {"pp": 2, "pp_schedule": "zbv", "pp_stages_per_rank": 2}},
    {"name": "tp2_bf16", "parallel": {"tp": 2}, "precision": "bf16", "lr": BF16_LR},
    {"name": "fsdp2_bf16", "parallel": {"dp_shard": 2}, "precision": "bf16", "lr": BF16_LR},
    {"name": "tp2_tied", "parallel": {"tp": 2}, "model": {"tie_embeddings": True}},
    {"name": "fsdp2_tied", "parallel": {"dp_shard": 2}, "model": {"tie_embeddings": True}},
]
LAYOUTS_4 = [
    {"name": "dp2_tp2", "parallel": {"dp_shard": 2, "tp": 2}},
    {"name": "pp2_tp2", "parallel": {**PP2, "tp": 2, "pp_schedule": "1f1b"}},
    {"name": "hsdp2x2_ac_selective", "parallel": {"dp_replicate": 2, "dp_shard": 2,
                                                  "activation_checkpoint": "selective"}},
    {"name": "pp2_fsdp2_zbv", "parallel": {"pp": 2, "dp_shard": 2, "pp_schedule": "zbv", "pp_stages_per_rank": 2,
                                           "pp_microbatches": 2}},
    {"name": "load_tp2_into_dp2_tp2", "parallel": {"dp_shard": 2, "tp": 2}, "load": "tp2"},
    {"name": "load_tp2_into_pp2_tp2", "parallel": {**PP2, "tp": 2, "pp_schedule": "interleaved_1f1b",
                                                   "pp_stages_per_rank": 2}, "load": "tp2"},
]
LAYOUTS_8 = [
    {"name": "dp2_pp2_tp2", "parallel": {"dp_shard": 2, "pp": 2, "tp": 2, "pp_schedule": "interleaved_1f1b",
                                         "pp_stages_per_rank": 2, "pp_microbatches": 2}, "save": True},
    {"name": "load_dp2_pp2_tp2_into_hsdp_pp2", "parallel": {"dp_replicate": 2, "dp_shard": 2, "pp": 2,
                                                            "pp_schedule": "1f1b", "pp_microbatches": 2},
     "load": "dp2_pp2_tp2"},
]
TRAINED = [(2, lay) for lay in LAYOUTS_2] + [(4, lay) for lay in LAYOUTS_4 if "load" not in lay] + \
          [(8, lay) for lay in LAYOUTS_8 if "load" not in lay]


@pytest.fixture(scope="module")
def reference():
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    out = {}
    for recipe, lr, tied in (("fp32", LR, False), ("bf16", BF16_LR, False), ("fp32", LR, True)):
        # bf16: autocast with fp32 master weights
        engine = build_engine(tiny_args(tie_embeddings=tied), ParallelConfig(), PrecisionConfig(recipe=recipe), one,
                              seed=SEED)
        out[recipe, tied] = train_run(engine, make_data(), lr=lr)[0]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def results(workdir):
    """{world size: [per-rank results]}; the launches run in order (4 ranks load what 2 ranks saved)."""
    # the 2-rank job starts from SLURM variables only (as under srun), the others from torchrun's
    return {world: launch(world, layouts, workdir, env_style="slurm" if world == 2 else "torchrun")
            for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4), (8, LAYOUTS_8))}


def test_process_group_from_slurm_env(results):
    """SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST/JOB_ID alone start the gloo job (MASTER_* derived)."""
    inits = [r["_init"] for r in results[2]]
    assert [i["rank"] for i in inits] == [0, 1]
    assert all(i["world_size"] == 2 and i["backend"] == "gloo" for i in inits)
    assert len({i["master"] for i in inits}) == 1 and inits[0]["master"].startswith("localhost:")


@pytest.mark.parametrize("world, layout", TRAINED, ids=[f"{w}ranks-{lay['name']}" for w, lay in TRAINED])
def test_layout_matches_one_process(results, reference, world, layout):
    per_rank = [r[layout["name"]] for r in results[world]]
    precision = layout.get("precision", "fp32")
    ref = reference[precision, layout.get("model", {}).get("tie_embeddings", False)]
    tol = FP32_TOL if precision == "fp32" else BF16_TOL
    for res in per_rank:  # the returned loss is the same on every rank (dp mean, broadcast from the last stage)
        assert res["losses"] == per_rank[0]["losses"] and res["eval"] == per_rank[0]["eval"]
        assert res["norms"] == pytest.approx(per_rank[0]["norms"], rel=1e-6)
    got = per_rank[0]
    assert len(got["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= tol
    assert max(abs(a - b) for a, b in zip(got["evals"], ref["evals"])) <= tol  # mid-run and final validation
    assert got["norms"] == pytest.approx(ref["norms"], rel=1e-4 if precision == "fp32" else 3e-2)
    sharded = layout["parallel"].get("tp", 1) > 1 or layout["parallel"].get("dp_shard", 1) > 1 \
        or layout["parallel"].get("dp_replicate", 1) > 1
    if sharded:  # foreach AdamW and clipping see one tensor type
        assert all(res["all_dtensor"] for res in per_rank)
    coords = {(r["dp_rank"], r["pp_rank"], r["tp_rank"]) for r in per_rank}
    assert len(coords) == world  # every rank has its own place in the mesh


def test_pipeline_runs_one_schedule_step_per_optimizer_step(results):
    """Gradient accumulation is folded into the pipeline's micro-batches: one flush per optimizer step (the
    per-micro-step API, kept for callers that drive micro-steps themselves, flushes once per micro-step)."""
    for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4), (8, LAYOUTS_8)):
        for lay in layouts:
            if lay["parallel"].get("pp", 1) == 1 or "load" in lay:
                continue
            expected = STEPS * (GRAD_ACCUM if lay.get("per_micro_step") else 1)
            assert [r[lay["name"]]["schedule_steps"] for r in results[world]] == [expected] * world, lay["name"]
    assert all(r["tp2"]["schedule_steps"] == 0 for r in results[2])


def test_fsdp_reduces_every_micro_step_unless_no_sync_is_chosen(results):
    """Default: a non-final micro-step already reduce-scatters into sharded .grad (no unsharded fp32 gradient
    copy); `fsdp_no_sync_accumulation` holds gradients back until the last micro-step."""
    assert [r["fsdp2_ac_full"]["reduced_after_micro_step"] for r in results[2]] == [True, True]
    assert [r["fsdp2_no_sync"]["reduced_after_micro_step"] for r in results[2]] == [False, False]


def test_tp_sp_collectives_per_block(results):
    """TP + SP: each block does 2 all-gathers + 2 reduce-scatters forward, the same backward, nothing else."""
    comm = results[2][0]["tp2"]["comm"]["per_module"]
    n_layers = tiny_args().n_layers
    for i in range(n_layers):
        block = comm[f"Transformer.layers.{i}"]
        assert block["forward"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
        assert block["backward"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    assert comm["Transformer.tok_embeddings"]["forward"] == {"reduce_scatter_tensor": 1}
    assert comm["Transformer.output"]["forward"] == {"all_gather_into_tensor": 1}
    # the vocab-parallel loss reduces scalars per token (max, sum-exp, target logit), it never gathers logits
    glob = comm["Global"]
    assert glob["forward"]["all_gather_into_tensor"] == 2 * n_layers + 1
    assert glob["forward"]["reduce_scatter_tensor"] == 2 * n_layers + 1
    assert set(glob["forward"]) == {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"}
    assert glob["backward"] == {"all_gather_into_tensor": 2 * n_layers + 1, "reduce_scatter_tensor": 2 * n_layers + 1}


LOADS = [(4, "load_tp2_into_dp2_tp2"), (4, "load_tp2_into_pp2_tp2"), (8, "load_dp2_pp2_tp2_into_hsdp_pp2")]


@pytest.mark.parametrize("world, name", LOADS, ids=[n for _, n in LOADS])
def test_checkpoint_reshards_across_layouts(results, world, name):
    """Model + optimizer saved with DCP in one layout (TP2; FSDP x PP x TP after training) load exactly in
    another (DP x TP, interleaved PP x TP, HSDP x PP)."""
    for res in results[world]:
        load = res[name]["load"]
        assert load["max_param_diff"] == 0.0
        assert load["optimizer_steps"] == [float(STEPS)]
    total = sum(r[name]["load"]["n_params"] for r in results[world] if r[name]["tp_rank"] == 0
                and r[name]["dp_rank"] == 0)
    one = DistInfo(0, 1, 0, torch.device("cpu"), None)
    assert total == len(dict(build_engine(tiny_args(), ParallelConfig(), None, one, seed=0).named_parameters()))
