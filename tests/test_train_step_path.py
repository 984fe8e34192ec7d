"""The GPU-facing path of a training step, checked on CPU: no host syncs between log steps, one-step-ahead batch
prefetch, per-micro-batch hooks, the MFU fields, train.deterministic."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.train.data import StepBatches
from megatron_ext.train.loop import build_engine, set_deterministic, train
from megatron_ext.train.preflight import plan
from megatron_ext.train.trainer import Trainer
from parallel.dist import init_distributed
from train_helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ops that read a device value on the host (on CUDA each one waits for the stream to drain)
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
            "aten.masked_select", "aten.unique", "aten._unique2")
# host reads that bypass the dispatcher on a CPU tensor (tolist / numpy read memory directly; .cpu() is a no-op)
SYNC_METHODS = ("tolist", "numpy", "cpu", "item")


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name.startswith(SYNC_OPS):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _trainer(tmp_path, **sections) -> Trainer:
    cfg = tiny_cfg(tmp_path / "run", **sections)
    model_args, layout, accum = plan(cfg, 1)
    trainer = Trainer(cfg, model_args, layout, accum, init_distributed(), build_engine)
    trainer.setup()
    trainer.resume()
    trainer.engine.set_train(True)
    return trainer


def _count_step_syncs(trainer, monkeypatch) -> collections.Counter:
    counter = HostSyncCounter()
    for method in SYNC_METHODS:
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, _name=method, **kwargs):
            counter.counts[f"Tensor.{_name}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    with counter:
        trainer.train_step()
    monkeypatch.undo()
    return counter.counts


@pytest.mark.parametrize("recipe", ["fp32", "bf16"])
def test_non_logging_step_makes_no_host_syncs(tmp_path, monkeypatch, recipe):
    """A step between log steps reads nothing back: loss, grad norm and clipping stay on the device. Grad
    accumulation (4 micro-batches) included. The optimizer is the fused AdamW (hibari's GPU default): torch's
    foreach AdamW (the CPU default) reads its per-parameter step counters on the host (counted below, which also
    shows that the counter sees syncs)."""
    trainer = _trainer(tmp_path / "fused", precision={"recipe": recipe}, optim={"fused": True},
                       train={"global_batch_size": 8})
    assert trainer.accum == 4
    trainer.train_step()  # first step: lazily created optimizer state
    counts = _count_step_syncs(trainer, monkeypatch)
    assert counts == {}, counts
    assert trainer.step == 2

    control = _trainer(tmp_path / "foreach", precision={"recipe": recipe}, optim={"fused": False})
    control.train_step()
    counts = _count_step_syncs(control, monkeypatch)
    n_params = sum(1 for _ in control.engine.parameters())
    # the bias corrections of step t read each parameter's step counter, twice (.item() -> _local_scalar_dense)
    assert counts == {"aten._local_scalar_dense": 2 * n_params, "Tensor.item": 2 * n_params}, counts


def test_read_records_is_the_one_sync(tmp_path, monkeypatch):
    """read_records turns a window of pending steps into numbers (syncing once for all of them); the MFU fields use
    the bf16 peak (`mfu`) and the peak of the recipe's GEMM dtype (`mfu_recipe`)."""
    import parallel.flops

    trainer = _trainer(tmp_path, optim={"fused": True})
    pending = [trainer.train_step() for _ in range(3)]
    assert all(isinstance(r["loss"], torch.Tensor) and isinstance(r["grad_norm"], torch.Tensor) for r in pending)
    peaks = {"bf16": 1e12, "fp8": 2e12, "fp4": 4e12}
    monkeypatch.setattr(parallel.flops, "peak_flops", lambda device, dtype="bf16": peaks[dtype])
    trainer.peak = peaks["bf16"]
    pending[1]["precision"] = "fp8_tensorwise"
    pending[2]["precision"] = "bf16_fwd+nvfp4_bwd"  # after precision.switch_at: reported against bf16
    records = trainer.read_records(pending, elapsed_s=0.3)
    assert [r["step"] for r in records] == [1, 2, 3]
    tps = 4 * 32 / 0.1
    mfu = tps * trainer.flops_per_token / 1e12
    assert [r["mfu"] for r in records] == pytest.approx([mfu] * 3)
    assert [r["mfu_recipe"] for r in records] == pytest.approx([mfu, mfu / 2, mfu])
    assert all(isinstance(r["loss"], float) for r in records)


def test_step_batches_prefetch_order():
    loads = []

    def load(first):
        loads.append(first)
        return [("batch", first)]

    batches = StepBatches(load)
    assert batches.get(0) == [("batch", 0)] and loads == [0]  # nothing prefetched: loaded now
    batches.prefetch(4)
    assert loads == [0, 4] and batches.prefetched == 4
    assert batches.get(4) == [("batch", 4)] and loads == [0, 4]  # the prefetched step: no second load
    assert batches.prefetched is None
    batches.prefetch(8)
    assert batches.get(12) == [("batch", 12)] and loads == [0, 4, 8, 12]  # another step (a resume): loaded
    assert batches.prefetched is None  # a stale prefetch is dropped, never served later
    assert batches.get(8) == [("batch", 8)] and loads == [0, 4, 8, 12, 8]


def test_trainer_reads_next_step_during_the_current_one(tmp_path):
    """After step N the samples of step N+1 are already read (on CUDA: copied asynchronously from pinned memory);
    step N+1 reads nothing more; the last step prefetches nothing past the planned data."""
    trainer = _trainer(tmp_path, train={"steps": 3})
    reads = []
    real_ds = trainer.train_ds

    class Recording:
        def __len__(self):
            return len(real_ds)

        def __getitem__(self, i):
            reads.append(i)
            return real_ds[i]

    trainer.train_ds = Recording()
    gbs = trainer.cfg.train.global_batch_size
    trainer.train_step()
    assert reads == list(range(0, 2 * gbs))  # step 1 and (prefetched) step 2
    trainer.train_step()
    assert reads == list(range(0, 3 * gbs))  # step 2 came from the prefetch; step 3 prefetched
    trainer.train_step()
    assert reads == list(range(0, 3 * gbs)) and len(real_ds) == 3 * gbs  # nothing beyond the last step


def test_forward_backward_step_calls_hook_per_micro_batch(tmp_path):
    """The engine calls `before_micro_batch(i)` before each micro-batch (the trainer keys stochastic rounding by it),
    and the accumulated gradients equal the mean of the micro-batch gradients (oracle: torch.autograd.grad per
    micro-batch on the same plain module)."""
    trainer = _trainer(tmp_path, train={"global_batch_size": 6})
    engine = trainer.engine
    batches = trainer.step_batches.get(0)
    assert len(batches) == 3
    calls = []
    engine.model_parts[0].zero_grad(set_to_none=True)
    loss = engine.forward_backward_step([(t, lab, None) for t, lab, _ in batches], before_micro_batch=calls.append)
    assert calls == [0, 1, 2]
    params = list(engine.parameters())
    ref_grads = [torch.zeros_like(p) for p in params]
    ref_losses = []
    for tokens, labels, _ in batches:
        logits = engine.model_parts[0](tokens)
        mb_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        ref_losses.append(mb_loss.detach())
        for acc, g in zip(ref_grads, torch.autograd.grad(mb_loss, params)):
            acc += g / 3
    assert loss.item() == pytest.approx(torch.stack(ref_losses).mean().item(), rel=1e-6)
    for p, ref in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)


def test_poll_and_stop_agreement_only_at_read_steps(tmp_path, monkeypatch):
    """An async save is polled (an all-ranks flag) and stop signals agreed only at log/read steps."""
    from megatron_ext.train.checkpoint import Checkpointer
    from megatron_ext.train.signals import StopSignals

    calls = collections.Counter()
    real_poll, real_agreed = Checkpointer.poll, StopSignals.agreed

    def poll(self):
        calls["poll"] += 1
        return real_poll(self)

    def agreed(self):
        calls["agreed"] += 1
        return real_agreed(self)

    monkeypatch.setattr(Checkpointer, "poll", poll)
    monkeypatch.setattr(StopSignals, "agreed", agreed)
    # steps 1..7: saves at 3, 6 and 7 (final); log.interval 5 reads at 3, 5, 6, 7; polls at the non-save read: 5
    summary = train(tiny_cfg(tmp_path / "run", train={"steps": 7}, checkpoint={"interval": 3, "async_save": True},
                             log={"interval": 5}))
    assert summary["step"] == 7
    assert calls == {"poll": 1, "agreed": 4}, calls


def test_deterministic_flag(tmp_path, monkeypatch):
    """train.deterministic: deterministic algorithms + cuBLAS workspace for the run (CPU numbers unchanged: CPU
    kernels are deterministic already); turned off again by a run without it."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        ref = train(tiny_cfg(tmp_path / "a", train={"steps": 2}, checkpoint={"interval": 0}))["losses"]
        assert not torch.are_deterministic_algorithms_enabled()
        det = train(tiny_cfg(tmp_path / "b", train={"steps": 2, "deterministic": True},
                             checkpoint={"interval": 0}))["losses"]
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert det == ref
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
