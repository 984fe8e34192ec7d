"""Experiment tracking: a W&B run in offline mode (no network) holds what hibari logged, read back from the run's
`.wandb` file with an independent reader (LevelDB-log framing + wandb's own protobuf schema)."""

import json
import struct
import sys
import time

import pytest

pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")

from megatron_ext.train.tracking import WandbConfig, WandbSink, metric_name  # noqa: E402

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte header ":W&B" + magic + version, 32 KiB blocks


def _records(path):
    """Protobuf records of one .wandb file (FULL, or FIRST..MIDDLE..LAST fragments)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a record header never straddles a block: the tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_dir) -> dict[int, dict]:
    """{step: {name: value}} of every history record in the offline W&B run(s) under run_dir/wandb."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir / 'wandb'}"
    history: dict[int, dict] = {}
    for path in files:
        # wandb's service process may still be writing after run.finish() returns: wait for the exit record
        deadline = time.monotonic() + 60
        while not any(r.WhichOneof("record_type") == "exit" for r in _records(path)):
            assert time.monotonic() < deadline, f"{path}: no exit record after 60 s"
            time.sleep(0.2)
        for record in _records(path):
            if record.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return history


def test_wandb_offline_run_holds_logged_metrics(tmp_path):
    sink = WandbSink(WandbConfig(project="hibari-test", name="tiny", mode="offline"), tmp_path,
                     config={"train": {"steps": 3}})
    for step in (1, 2, 3):
        sink.log({"step": step, "loss": 4.0 / step, "val_loss": None, "lr": 1e-3 * step, "precision": "fp32",
                  "val/ja_web/loss": 5.0 / step, "time": 123.0})
    sink.log_event({"event": "eval", "step": 3, "eval/hibari_ja_mc/acc": 0.375, "time": 124.0})
    sink.log_event({"event": "lr_change", "step": 3, "old_lr": 1.0, "new_lr": 2.0})  # not a metric
    sink.close()
    history = wandb_history(tmp_path)
    assert sorted(history) == [1, 2, 3]
    for step in (1, 2, 3):
        assert history[step]["train/loss"] == pytest.approx(4.0 / step)
        assert history[step]["train/lr"] == pytest.approx(1e-3 * step)
        assert history[step]["val/ja_web/loss"] == pytest.approx(5.0 / step)
        assert "train/val_loss" not in history[step] and "train/precision" not in history[step]
    assert history[3]["eval/hibari_ja_mc/acc"] == 0.375
    assert "train/old_lr" not in history[3]
    # a resumed run continues the same W&B run id
    assert (tmp_path / "wandb" / "hibari_run_id").read_text().strip() in \
        next((tmp_path / "wandb").glob("offline-run-*")).name


def test_metric_names():
    assert metric_name("loss") == "train/loss"
    assert metric_name("val/en_replay/ppl") == "val/en_replay/ppl"


def test_missing_wandb_is_one_line(tmp_path, monkeypatch):
    from hibari.errors import HibariError

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(HibariError, match=r"pip install 'hibari\[wandb\]'"):
        WandbSink(WandbConfig(project="p", mode="offline"), tmp_path)


def test_training_run_logs_to_wandb_offline(tmp_path):
    """log.wandb in a training config: every step's metrics (and validation) are in the offline W&B run."""
    from megatron_ext.train.loop import train
    from megatron_ext.train.metrics import read_metrics
    from train_helpers import tiny_cfg

    run = tmp_path / "run"
    train(tiny_cfg(run, train={"steps": 4, "eval_interval": 2, "eval_batches": 1}, checkpoint={"interval": 0},
                   log={"wandb": {"project": "hibari-test", "mode": "offline"}}))
    history = wandb_history(run)
    records = read_metrics(run)
    assert sorted(history) == [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"])
        assert history[r["step"]]["train/lr"] == pytest.approx(r["lr"])
        assert history[r["step"]]["train/grad_norm"] == pytest.approx(r["grad_norm"])
    assert [s for s in sorted(history) if "train/val_loss" in history[s]] == [2, 4]
    assert history[4]["train/val_loss"] == pytest.approx(records[-1]["val_loss"])
