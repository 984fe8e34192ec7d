"""parallel/: layout validation, distributed init from torchrun/SLURM env, and the one-process engine.

Multi-process layouts (TP/SP, PP schedules, FSDP2/HSDP and their combinations) are in test_parallel_multi.py.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hibari.errors import HibariError
from megatron_ext.models.llama import Transformer
from megatron_ext.precision.config import PrecisionConfig
from hibari.env import first_slurm_host, resolve_env
from megatron_ext.models.llama_parallel import LlamaPlan, build_engine
from megatron_ext.precision.config import Recipe
from parallel import DistInfo, ParallelConfig, init_distributed, peak_flops, validate_layout
from parallel.dist import check_gpus_per_node, cuda_env
from parallel.flops import RECIPE_GEMM_DTYPE, peak_flops_for
from parallel.pipeline import last_stage_owner, local_stage_ids, stage_layer_ids, stage_owner
from parallel_worker import SEED, make_data, tiny_args, train_run

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


# ------------------------------------------------------------------------------------------ validate_layout

def test_validate_layout_resolves_dp_shard_and_microbatches():
    args = tiny_args()
    cfg = validate_layout(ParallelConfig(tp=2, pp=2), args, 8)
    assert (cfg.dp_shard, cfg.pp_microbatches, cfg.pp_stages_per_rank) == (2, 2, 1)
    cfg = validate_layout(ParallelConfig(dp_replicate=2, pp=2, pp_schedule="zbv", pp_stages_per_rank=2), args, 4)
    assert (cfg.dp_shard, cfg.pp_microbatches) == (1, 4)
    assert validate_layout(ParallelConfig(), args, 1).dp_shard == 1


@pytest.mark.parametrize("cfg, world, model, fragment", [
    (dict(tp=4), 6, {}, "world size 6 is not divisible by dp_replicate x tp x pp"),
    (dict(tp=2, dp_shard=2), 8, {}, "does not equal the world size 8"),
    (dict(tp=4), 4, {}, "model.n_kv_heads=2 is not divisible by tp"),
    (dict(tp=4), 4, dict(n_heads=6, n_kv_heads=6, dim=48), "model.n_heads=6 is not divisible by tp"),
    (dict(tp=2), 2, dict(vocab_size=127), "model.vocab_size=127"),
    (dict(pp=3), 3, {}, "model.n_layers=4 is not divisible by the 3 pipeline stages"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=4), 2, {}, "8 pipeline stages"),
    (dict(pp=2, pp_schedule="1f1b", pp_stages_per_rank=2), 2, {}, "needs pp_stages_per_rank=1"),
    (dict(pp=2, pp_schedule="zbv"), 2, {}, "zbv: needs pp_stages_per_rank=2"),
    (dict(pp=2, pp_schedule="interleaved_zb"), 2, {}, "needs pp_stages_per_rank >= 2"),
    (dict(pp=2, pp_microbatches=1), 2, {}, "needs at least pp=2 microbatches"),
    (dict(pp=2), 2, dict(tie_embeddings=True), "tied embeddings"),
])
def test_validate_layout_errors_are_one_line(cfg, world, model, fragment):
    with pytest.raises(HibariError) as err:
        validate_layout(ParallelConfig(**cfg), tiny_args(**model), world)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg and msg.startswith("parallel")


def test_quantized_recipe_keeps_the_models_first_and_last_blocks_in_bf16_under_pp():
    prec = PrecisionConfig(recipe="fp8_tensorwise", bf16_first_layers=1, bf16_last_layers=1)
    plan = LlamaPlan(tiny_args(), prec)
    kinds = {}
    for stage in range(2):
        part = plan.build_stage(stage_layer_ids(stage, 2, 4), first=stage == 0, last=stage == 1)
        kinds.update({k: type(b.attention.wq).__name__ for k, b in part.layers.items()})
    assert kinds == {"0": "Linear", "1": "QuantizedLinear", "2": "QuantizedLinear", "3": "Linear"}


def test_stage_placement():
    assert stage_layer_ids(1, 4, 8) == [2, 3]
    assert local_stage_ids(0, 2, 2, "interleaved_1f1b") == [0, 2]
    assert local_stage_ids(1, 4, 2, "zbv") == [1, 6]
    assert (last_stage_owner(4, 2, "zbv"), last_stage_owner(4, 1, "1f1b"), last_stage_owner(2, 2, "interleaved_1f1b")) \
        == (0, 3, 1)
    # the one stage -> rank map: every stage has exactly one owner, and local_stage_ids is its inverse
    for pp, v, schedule in ((4, 2, "zbv"), (2, 2, "interleaved_1f1b"), (4, 1, "1f1b")):
        owned = sorted(s for r in range(pp) for s in local_stage_ids(r, pp, v, schedule))
        assert owned == list(range(pp * v))
        assert all(stage_owner(s, pp, schedule) == r for r in range(pp) for s in local_stage_ids(r, pp, v, schedule))


# --------------------------------------------------------------------------------------------- dist init

@pytest.mark.parametrize("nodelist, host", [
    ("n[1-3],gpu07", "n1"),
    ("gpu07", "gpu07"),
    ("gpu[07-09,11]", "gpu07"),
    ("rack[2,5]-n[10-12],x1", "rack2-n10"),
    ("a-b[003-004]", "a-b003"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_env_is_translated():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[1-3],gpu07",
           "SLURM_JOB_ID": "123456"}
    out = resolve_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                   "MASTER_PORT": str(15000 + 123456 % 20000)}


def test_torchrun_env_wins_over_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7",
           "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert resolve_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                                "MASTER_PORT": "29400"}


def test_bad_env_is_a_one_line_error():
    with pytest.raises(HibariError, match="RANK 4 is not below WORLD_SIZE 4"):
        resolve_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(HibariError, match="SLURM_NTASKS|WORLD_SIZE"):
        resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"})


def test_init_distributed_without_env_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized()
    assert peak_flops(info.device) is None if info.device.type == "cpu" else True


# ----------------------------------------------------------------------------------- one-process engine

def _plain_reference(data, grad_accum=2, max_norm=1.0, lr=1e-2):
    """The same training as train_run, written with nothing but torch: Transformer + CE + clip + AdamW."""
    torch.manual_seed(SEED)
    model = Transformer(tiny_args())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=True)
    losses, norms = [], []
    for tokens, docs in data:
        micro = tokens.shape[0] // grad_accum
        total = 0.0
        for m in range(grad_accum):
            r = slice(m * micro, (m + 1) * micro)
            logits = model(tokens[r, :-1], document_ids=None if docs is None else docs[r, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[r, 1:].flatten())
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms


@pytest.mark.parametrize("per_micro_step", [False, True], ids=["forward_backward_step", "forward_backward"])
def test_single_process_engine_matches_plain_pytorch(per_micro_step):
    data = make_data()
    engine = build_engine(tiny_args(), ParallelConfig(), PrecisionConfig(recipe="fp32"), ONE, seed=SEED)
    assert engine.mesh is None and engine.dp_size == 1 and engine.is_last_stage
    run, _ = train_run(engine, data, per_micro_step=per_micro_step)
    ref_losses, ref_norms = _plain_reference(data)
    assert max(abs(a - b) for a, b in zip(run["losses"], ref_losses)) <= 1e-6
    assert max(abs(a - b) / b for a, b in zip(run["norms"], ref_norms)) <= 1e-5
    assert run["losses"][-1] < run["losses"][0] + 0.1 and math.isfinite(run["eval"])


def test_tied_embeddings_stay_tied():
    engine = build_engine(tiny_args(tie_embeddings=True), ParallelConfig(), None, ONE, seed=SEED)
    model = engine.model_parts[0]
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(engine.parameters())) == len(list(Transformer(tiny_args(tie_embeddings=True)).parameters()))


def test_init_is_seeded_and_full_state_overrides():
    torch.manual_seed(SEED)
    ref = Transformer(tiny_args()).state_dict()
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED)
    sd = engine.model_state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert list(sd)[0] == "tok_embeddings.weight" and list(sd)[-1] == "output.weight"
    override = {k: torch.full_like(v, 0.5) for k, v in ref.items()}
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED, full_state_dict=override)
    assert all(torch.equal(v, override[k]) for k, v in engine.model_state_dict().items())
    with pytest.raises(HibariError, match="missing"):
        build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED,
                     full_state_dict={k: v for k, v in ref.items() if k != "norm.weight"})


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_numbers_and_names(mode):
    data = make_data(steps=2)
    base, _ = train_run(build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED), data)
    engine = build_engine(tiny_args(), ParallelConfig(activation_checkpoint=mode, ac_every_n_layers=2), None, ONE,
                          seed=SEED)
    wrapped = [k for k, b in engine.model_parts[0].layers.items() if type(b).__name__ == "CheckpointWrapper"]
    assert wrapped == (["0", "1", "2", "3"] if mode == "full" else ["0", "2"])
    run, _ = train_run(engine, data)
    assert max(abs(a - b) for a, b in zip(run["losses"], base["losses"])) <= 1e-6
    assert all("_checkpoint_wrapped_module" not in k for k in engine.model_state_dict())
    assert all("_checkpoint_wrapped_module" not in k for k, _ in engine.named_parameters())


def test_bf16_runs_under_autocast_close_to_fp32():
    data = make_data(steps=2)
    fp32, _ = train_run(build_engine(tiny_args(), ParallelConfig(), PrecisionConfig(recipe="fp32"), ONE,
                                     seed=SEED), data)
    bf16, _ = train_run(build_engine(tiny_args(), ParallelConfig(), PrecisionConfig(recipe="bf16"), ONE,
                                     seed=SEED), data)
    diff = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"]))
    assert 0 < diff <= 3e-2  # bf16 really ran (not identical) and stays close


def test_clip_measures_only_with_nonpositive_max_norm():
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED)
    tokens = make_data(steps=1)[0][0]
    engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
    before = [p.grad.clone() for p in engine.parameters()]
    norm_t = engine.clip_grad_norm_(0.0)
    assert norm_t.dim() == 0 and norm_t.dtype == torch.float32 and norm_t.device == engine.device
    norm = float(norm_t)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))), rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, engine.parameters()))
    assert float(engine.clip_grad_norm_(norm / 2)) == pytest.approx(norm, rel=1e-6)
    assert float(engine.clip_grad_norm_(0.0)) == pytest.approx(norm / 2, rel=1e-4)
    assert float(engine.clip_grad_norm_(norm)) == pytest.approx(norm / 2, rel=1e-4)  # below max_norm: unchanged


class _HostSyncCounter(TorchDispatchMode):
    """Counts ops that copy a device value to the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()`)."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.equal", "aten.is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.n_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n_ops += 1
        if str(func).startswith(self.SYNC_OPS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_engine_step_makes_no_host_sync():
    """forward_backward_step + clip_grad_norm_ (clipping active) read nothing back to the host."""
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED)
    tokens, docs = make_data(steps=2)[1]
    batches = [(tokens[r, :-1], tokens[r, 1:], docs[r, :-1]) for r in (slice(0, 4), slice(4, 8))]
    with _HostSyncCounter() as counter:
        loss = engine.forward_backward_step(batches)
        norm = engine.clip_grad_norm_(1e-3)
    assert counter.n_ops > 100 and counter.syncs == []
    assert float(norm) > 1e-3 and math.isfinite(float(loss))
    assert float(engine.clip_grad_norm_(0.0)) == pytest.approx(1e-3, rel=1e-3)  # it did clip
    with _HostSyncCounter() as counter:  # the counter does see a sync when there is one
        float(loss)
    assert counter.syncs == ["aten._local_scalar_dense.default"]


def test_cuda_env_and_gpus_per_node():
    assert cuda_env(tp=2, dp=1) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                    "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cuda_env(tp=2, dp=2)  # would serialise FSDP comms with compute
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cuda_env(tp=1, dp=1)
    check_gpus_per_node(8, gpus=8)
    check_gpus_per_node(4, gpus=0)  # no GPU: gloo on CPU runs any number of ranks
    with pytest.raises(HibariError) as err:
        check_gpus_per_node(4, gpus=1)
    assert "\n" not in str(err.value) and "4 ranks per node" in str(err.value) and "--nproc 1" in str(err.value)


def test_peak_flops_by_exact_device_name():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops_for("NVIDIA H100 PCIe") == pytest.approx(756.5e12)  # not the SXM number
    assert peak_flops_for("NVIDIA H100 NVL", "fp8") == pytest.approx(1670.5e12)
    assert peak_flops_for("NVIDIA H200", "fp8") == pytest.approx(2 * peak_flops_for("NVIDIA H200"), rel=1e-3)
    assert peak_flops_for("NVIDIA B200", "fp4") == pytest.approx(9e15)
    assert peak_flops_for("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 tensor cores
    assert peak_flops_for("NVIDIA H100 PCIe", "fp4") is None
    assert peak_flops_for("Some Future GPU") is None
    assert set(RECIPE_GEMM_DTYPE) == set(typing.get_args(Recipe))


def test_forward_loss_and_bad_batches():
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED)
    tokens = make_data(steps=1)[0][0]
    engine.set_train(False)
    val = engine.forward_loss(tokens[:, :-1], tokens[:, 1:])
    assert val.dtype == torch.float32 and val.dim() == 0
    assert all(p.grad is None for p in engine.parameters())
    assert engine.dp_mean(val) is val
    with pytest.raises(HibariError, match=r"tokens must be \[batch, seq\]"):
        engine.forward_loss(tokens[0], tokens[0])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_round_trip_of_model_and_optimizer(tmp_path):
    import torch.distributed.checkpoint as dcp

    data = make_data(steps=3)
    engine = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED)
    _, opt = train_run(engine, data[:2])
    dcp.save({"model": engine.model_state_dict(), "optimizer": engine.optimizer_state_dict(opt)},
             checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    cont, _ = train_run(engine, data[2:], opt=opt)

    fresh = build_engine(tiny_args(), ParallelConfig(), None, ONE, seed=SEED + 1)
    fresh_opt = torch.optim.AdamW(list(fresh.parameters()), lr=1e-2, weight_decay=0.1, foreach=True)
    state = {"model": fresh.model_state_dict(), "optimizer": fresh.optimizer_state_dict(fresh_opt)}
    assert all(k.startswith(("tok_embeddings", "layers.", "norm", "output")) for k in state["model"])
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    fresh.load_model_state_dict(state["model"])
    fresh.load_optimizer_state_dict(fresh_opt, state["optimizer"])
    assert {float(s["step"]) for s in fresh_opt.state_dict()["state"].values()} == {2.0}
    resumed, _ = train_run(fresh, data[2:], opt=fresh_opt)
    assert resumed == cont  # bitwise: same weights, same optimizer moments


def test_parallel_imports_no_model_and_nothing_above_it():
    """parallel/ is model-agnostic: no import (lazy ones included) of megatron_ext, checkpoints, data_pipeline,
    launch; models reach it through a ModelPlan."""
    import ast
    from pathlib import Path

    import parallel

    above = {"megatron_ext", "checkpoints", "data_pipeline", "launch"}
    found = []
    files = sorted(Path(parallel.__file__).parent.glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(path.name, n) for n in names if n.split(".")[0] in above]
    assert len(files) >= 8 and found == []
