"""Checkpoints: bitwise resume (CPU fp32, one process), crash mid-save, async save, keep-last, continual pretraining."""

import json
import shutil

import pytest
import torch

from megatron_ext.checkpoint import find_latest
from megatron_ext.checkpoint import storage as storage_mod
from megatron_ext.train.checkpoint import CheckpointError
from megatron_ext.train.loop import train
from train_helpers import tiny_cfg


def _model_tensors(step_dir):
    from megatron_ext.checkpoint import iter_model_tensors

    return dict(iter_model_tensors(step_dir))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go, checkpoints at 3 and 6: the reference every resume must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("ref") / "run"
    summary = train(tiny_cfg(run))
    return run, summary["losses"]


def test_crash_mid_save_then_bitwise_resume(tmp_path, uninterrupted, monkeypatch):
    ref_dir, ref = uninterrupted
    run = tmp_path / "run"
    real_save = storage_mod.dcp.save

    def crashing_save(state, **kwargs):
        if "step_00000006" in str(kwargs["storage_writer"].path):
            real_save({"model": state["model"]}, **kwargs)  # half the checkpoint hits the disk
            raise OSError(28, "No space left on device", str(kwargs["storage_writer"].path) + "/__0_0.distcp")
        return real_save(state, **kwargs)

    monkeypatch.setattr(storage_mod.dcp, "save", crashing_save)
    with pytest.raises(CheckpointError) as err:
        train(tiny_cfg(run))
    msg = str(err.value)
    assert "\n" not in msg and "step 6" in msg and "__0_0.distcp: No space left on device" in msg, msg
    assert "previous checkpoint step_00000003 is intact" in msg
    monkeypatch.setattr(storage_mod.dcp, "save", real_save)
    root = run / "checkpoints"
    assert not (root / ".tmp_step_00000006").exists()  # the torn save is removed
    assert (root / "latest").read_text().strip() == "step_00000003" == find_latest(root).name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6

    summary = train(tiny_cfg(run))  # the same command again: resumes from `latest`
    assert summary["resumed_from"].endswith("step_00000003")
    assert sorted(summary["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert summary["losses"][step] == ref[step], (step, summary["losses"][step], ref[step])  # bit for bit
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps 4-6 of the crashed run were replaced
    a, b = _model_tensors(root / "step_00000006"), _model_tensors(ref_dir / "checkpoints" / "step_00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((root / "step_00000006" / "train_state.json").read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 24
    assert (root / "step_00000006" / "rng" / "rank_00000.json").is_file()


def test_async_save_resumes_bitwise_and_keeps_last_k(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, checkpoint={"interval": 2, "keep_last": 2, "async_save": True}))
    assert summary["losses"] == ref  # saving in the background does not disturb training
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    # resume a copy from the async-written step 4
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "step_00000004", resumed / "checkpoints" / "step_00000004")
    summary = train(tiny_cfg(resumed, checkpoint={"interval": 2, "async_save": True}))
    assert summary["losses"] == {5: ref[5], 6: ref[6]}


def test_continual_pretraining_rewarms_from_a_training_checkpoint(tmp_path, uninterrupted):
    """init.from a step directory: weights (+ optimizer) loaded, step counter and LR schedule start again."""
    ref_dir, ref = uninterrupted
    src = ref_dir / "checkpoints" / "step_00000006"
    run = tmp_path / "cpt"
    summary = train(tiny_cfg(run, init={"from": str(src), "load_optimizer": True},
                             train={"steps": 2}, checkpoint={"interval": 0}))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(1.5e-3)  # warmup again from the start
    assert records[0]["consumed_samples"] == 4
    assert summary["losses"][1] < ref[1] - 0.1  # starts from the trained weights, not from scratch
    # continuing the schedule instead (load_train_state) picks up step and data position
    run2 = tmp_path / "cont"
    summary = train(tiny_cfg(run2, init={"from": str(ref_dir / "checkpoints" / "step_00000003"),
                                         "load_optimizer": True, "load_train_state": True},
                             checkpoint={"interval": 0}))
    assert summary["losses"] == {4: ref[4], 5: ref[5], 6: ref[6]}


def test_sigusr1_saves_and_stops_then_resumes(tmp_path):
    """Preemption (SLURM --signal=USR1@T): checkpoint at the end of the current step, stop; a rerun finishes."""
    import os
    import signal
    import threading
    import time

    run = tmp_path / "run"

    def send_when_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = run / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=send_when_training, daemon=True)
    watcher.start()
    summary = train(tiny_cfg(run, train={"steps": 40}, checkpoint={"interval": 0}))
    watcher.join()
    stopped = summary["step"]
    assert summary["preempted"] and 2 <= stopped < 40
    assert find_latest(run / "checkpoints").name == f"step_{stopped:08d}"
    summary = train(tiny_cfg(run, train={"steps": 40}, checkpoint={"interval": 0}))
    assert not summary["preempted"] and summary["step"] == 40 and min(summary["losses"]) == stopped + 1


def test_extending_a_run_reports_an_lr_jump_and_shows_the_global_step(tmp_path, uninterrupted, capsys):
    """Resuming with a larger train.steps re-plans the cosine decay: the LR of the next step jumps. One line says so
    (old and new LR) and metrics.jsonl records it; the progress bar counts global steps (8/8, not 2/2)."""
    from megatron_ext.train.lr import lr_at
    from megatron_ext.train.metrics import read_metrics

    ref_dir, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    cfg = tiny_cfg(run, train={"steps": 8}, log={"progress": True})
    capsys.readouterr()
    summary = train(cfg)
    err = capsys.readouterr().err
    old, new = lr_at(6, cfg.lr, 6), lr_at(6, cfg.lr, 8)
    assert old != new
    assert f"LR at step 7 jumps {old:.4g} -> {new:.4g}" in err and "train.steps 6 -> 8" in err, err
    events = read_metrics(run, events=True)
    assert events == [{**events[0], "event": "lr_change", "step": 6, "old_lr": old, "new_lr": new}]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))  # step records stay clean
    assert sorted(summary["losses"]) == [7, 8]
    assert "[train] 8/8 step" in err, err

    # a schedule that does not move the planned steps (constant LR) resumes silently
    run2 = tmp_path / "constant"
    train(tiny_cfg(run2, lr={"schedule": "constant"}, train={"steps": 3}))
    capsys.readouterr()
    train(tiny_cfg(run2, lr={"schedule": "constant"}, train={"steps": 5}))
    assert "jumps" not in capsys.readouterr().err
    assert read_metrics(run2, events=True) == []


def test_log_interval_reads_values_in_batches_same_numbers(tmp_path, uninterrupted):
    """log.interval: 4 reads loss/grad norm (a host sync) only every 4 steps and before each save; the training and
    every recorded value are the same as reading them each step, step times are averaged over the window."""
    _, ref = uninterrupted
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, log={"interval": 4}))
    assert summary["losses"] == ref
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [ref[s] for s in range(1, 7)]
    # windows: steps 1-3 (read before the step-3 save), 4-6 (before the final save)
    assert records[0]["step_time_s"] == records[2]["step_time_s"] != records[3]["step_time_s"]
