"""Tensor parallel and FSDP2 (2 gloo processes): sharded quantized MLPs quantize exactly like the unsharded one.

One launch, several checks: for NVFP4 (RNE, and with stochastic rounding on: its counter-based noise is keyed by the
element's global position), FP8 tensorwise and FP8 rowwise, with and without sequence parallel, every
quantized GEMM operand of the TP2 run equals (bit for bit) the matching slice of the TP1 run's operand, outputs and
gradients agree to fp32 summation-order noise, and without the cross-rank amax reduction the operands differ (so the
check can fail). FSDP2 (fully_shard): forward bit-identical to the unsharded module, gradients equal to the
data-parallel average.
"""

import copy
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp(recipe_name: str, sr: bool = False):
    from megatron_ext.models.llama import FeedForward
    from megatron_ext.precision import PrecisionConfig, QuantizedLinear
    from megatron_ext.precision.linear import RECIPES

    torch.manual_seed(0)
    ff = FeedForward(64, 128)
    with torch.no_grad():
        ff.w2.weight[5, 70] = 1.5  # an outlier on rank 1's shard of w2: the global amax lives on one rank only
    cfg = PrecisionConfig(recipe=recipe_name, stochastic_rounding=sr)
    for name in ("w1", "w2", "w3"):
        lin = getattr(ff, name)
        rec = RECIPES[recipe_name](cfg, layer_seed=int(name[1]))  # same Hadamard signs on every rank
        rec.capture = {}
        setattr(ff, name, QuantizedLinear.from_linear(lin, rec))
    return ff


def _check(recipe_name, sequence_parallel, rank, mesh, failures, sr=False):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from megatron_ext.precision import set_step_context

    ref = _mlp(recipe_name, sr)
    tp = copy.deepcopy(ref)
    for name in ("w1", "w2", "w3"):  # deepcopy copies the recipes; give each its own capture dict
        getattr(tp, name).recipe.capture = {}
    if sequence_parallel:
        plan = {"w1": ColwiseParallel(input_layouts=Shard(1)), "w3": ColwiseParallel(input_layouts=Shard(1)),
                "w2": RowwiseParallel(output_layouts=Shard(1))}
    else:
        plan = {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}
    parallelize_module(tp, mesh, plan)
    for model in (ref, tp):  # TP ranks share the data-parallel rank: same noise for the same global element
        set_step_context(model, step=7, micro_batch=1, dp_rank=0)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 64, generator=g)
    dy = torch.randn(2, 32, 64, generator=g)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(dy)

    seq = slice(rank * 16, (rank + 1) * 16)
    x_tp = (x[:, seq] if sequence_parallel else x).clone().requires_grad_(True)
    y_tp = tp(x_tp)
    y_tp.backward(dy[:, seq] if sequence_parallel else dy)
    tag = f"{recipe_name} sp={sequence_parallel} sr={sr}"

    def fail(msg):
        failures.append(f"rank {rank} {tag}: {msg}")

    # operands: (layer, role) -> how the TP2 local operand slices the TP1 one
    half = lambda n: slice(rank * n // 2, (rank + 1) * n // 2)  # noqa: E731
    expect = {
        ("w1", "x_fwd"): (slice(None), slice(None)), ("w1", "w_fwd"): (half(128), slice(None)),
        ("w1", "dy_dgrad"): (slice(None), half(128)), ("w1", "dy_wgrad"): (half(128), slice(None)),
        ("w1", "x_wgrad"): (slice(None), slice(None)),
        ("w2", "x_fwd"): (slice(None), half(128)), ("w2", "w_fwd"): (slice(None), half(128)),
        ("w2", "dy_dgrad"): (slice(None), slice(None)), ("w2", "dy_wgrad"): (slice(None), slice(None)),
        ("w2", "x_wgrad"): (half(128), slice(None)),
    }
    if recipe_name == "fp8_rowwise":  # no weight reuse: dgrad quantizes W^T [K, N]
        expect[("w1", "w_dgrad")] = (slice(None), half(128))
        expect[("w2", "w_dgrad")] = (half(128), slice(None))
    for (layer, role), index in expect.items():
        got = getattr(tp, layer).recipe.capture.get(role)
        want = getattr(ref, layer).recipe.capture.get(role)
        if got is None or want is None:
            fail(f"{layer}.{role} not captured")
        elif not torch.equal(got, want[index]):
            fail(f"{layer}.{role} quantized operand differs from TP1 (max diff {(got - want[index]).abs().max()})")

    y_want = y_ref[:, seq] if sequence_parallel else y_ref
    if not torch.allclose(y_tp, y_want, rtol=1e-5, atol=1e-6):
        fail(f"output differs (max diff {(y_tp - y_want).abs().max()})")
    dx_want = x_ref.grad[:, seq] if sequence_parallel else x_ref.grad
    if not torch.allclose(x_tp.grad, dx_want, rtol=1e-5, atol=1e-6):
        fail(f"dx differs (max diff {(x_tp.grad - dx_want).abs().max()})")
    for layer, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
        local = getattr(tp, layer).weight.grad.to_local()
        full = getattr(ref, layer).weight.grad
        want = full.narrow(dim, rank * full.shape[dim] // 2, full.shape[dim] // 2)
        if not torch.allclose(local, want, rtol=1e-5, atol=1e-6):
            fail(f"{layer} weight grad differs (max diff {(local - want).abs().max()})")
    return tp, x


def _check_fsdp2(rank, mesh, failures):
    import warnings

    from torch.distributed.fsdp import fully_shard

    ref = _mlp("nvfp4")
    sharded = copy.deepcopy(ref)
    for name in ("w1", "w2", "w3"):
        getattr(sharded, name).recipe.capture = {}
        fully_shard(getattr(sharded, name), mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(10 + rank))  # different data per rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "returned a view tensor": nothing here modifies the output in place
        y = sharded(x)
    y_ref = ref(x)
    if not torch.equal(y, y_ref):
        failures.append(f"rank {rank} fsdp2: forward differs (max diff {(y - y_ref).abs().max()})")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for name in ("w1", "w2", "w3"):
        got = getattr(sharded, name).weight.grad.full_tensor()
        want = getattr(ref, name).weight.grad.clone()
        dist.all_reduce(want)
        want /= WORLD
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {rank} fsdp2: {name} grad differs (max diff {(got - want).abs().max()})")


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    failures = []
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        for recipe in ("nvfp4", "fp8_tensorwise", "fp8_rowwise"):
            for sp in (False, True):
                _check(recipe, sp, rank, mesh, failures)
        for sp in (False, True):
            _check("nvfp4", sp, rank, mesh, failures, sr=True)
        _check_fsdp2(rank, mesh, failures)
        # the check can fail: without the amax reduction the shards quantize with their local amax
        from megatron_ext.precision.recipes import ShardContext

        original = ShardContext.reduce_max
        ShardContext.reduce_max = lambda self, t, role=None: t
        try:
            probe = []
            _check("nvfp4", False, rank, mesh, probe)
            # rank 0's half of w2 lacks the outlier (the global amax): its local amax is smaller
            if rank == 0 and not any("w2.w_fwd" in p for p in probe):
                failures.append(f"rank {rank}: disabling the amax reduction did not change w2's quantized weight")
        finally:
            ShardContext.reduce_max = original
        # ... and SR noise keyed by LOCAL positions would differ: rank 1's shard of w1's dy is not at offset 0
        original_offsets = ShardContext.offsets
        ShardContext.offsets = lambda self, role, shape: (0, 0)
        try:
            probe = []
            _check("nvfp4", False, rank, mesh, probe, sr=True)
            if rank == 1 and not any("w1.dy_dgrad" in p for p in probe):
                failures.append(f"rank {rank}: local-position SR noise did not change w1's quantized dy")
        finally:
            ShardContext.offsets = original_offsets
    except Exception:
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        if dist.is_initialized():
            dist.destroy_process_group()


def test_tp2_and_fsdp2_quantize_identically_to_unsharded(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert all(r == "" for r in reports), "\n".join(reports)
