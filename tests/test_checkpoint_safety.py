"""Checkpoints a user can trust: nothing a file controls is unpickled (resume, init.from, convert hibari-to-hf),
damaged checkpoints are one line naming the file and resume falls back to the newest complete step, a full disk
during a save is one line and leaves the previous checkpoint intact."""

import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hibari.errors import HibariError
from megatron_ext.checkpoint import DCP_METADATA_JSON, find_resume_point, verify_checkpoint
from megatron_ext.train.loop import train
from train_helpers import tiny_cfg

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the marker file: proof that something unpickled a file we planted."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6: the run every damaged copy is compared with."""
    run = tmp_path_factory.mktemp("ref") / "run"
    return run, train(tiny_cfg(run))["losses"]


def _copy(reference, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    return run


def test_planted_pickles_are_never_loaded(tmp_path, reference):
    run = _copy(reference, tmp_path)
    marker = tmp_path / "pwned"
    step3, step6 = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000006"
    # beside a valid index: a DCP .metadata pickle and pickles in place of the other JSON files are never read
    _plant(step3 / ".metadata", marker)
    _plant(step3 / "rng" / "rank_00000.pt", marker)
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    shutil.rmtree(step6)
    summary = train(tiny_cfg(run))
    assert summary["resumed_from"].endswith("step_00000003")
    assert summary["losses"] == {s: reference[1][s] for s in (4, 5, 6)}
    assert not marker.exists()

    # a checkpoint whose index is only a pickle (plain DCP, or crafted): refused with one line, nothing unpickled
    crafted = tmp_path / "crafted"
    shutil.copytree(step3, crafted)
    (crafted / DCP_METADATA_JSON).unlink()
    _plant(crafted / ".metadata", marker)
    with pytest.raises(HibariError) as err:
        verify_checkpoint(crafted)
    assert "dcp_metadata.json not found" in str(err.value) and "could run code" in str(err.value)

    # ... as init.from (pre-flight names the field)
    with pytest.raises(HibariError, match="field init.from: .*dcp_metadata.json not found"):
        train(tiny_cfg(tmp_path / "init", model=None, init={"from": str(crafted)}))
    assert not (tmp_path / "init").exists()
    # ... as the run's own latest checkpoint
    resumed = tmp_path / "resume"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(crafted, resumed / "checkpoints" / "step_00000003")
    with pytest.raises(HibariError, match="no usable checkpoint") as err:
        train(tiny_cfg(resumed))
    assert "\n" not in str(err.value)
    # ... and by `hibari convert hibari-to-hf` (a real process: one line, exit 2, no output)
    r = subprocess.run([sys.executable, "-m", "launch.cli", "convert", "hibari-to-hf", "--ckpt", str(crafted),
                        "--out", str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "dcp_metadata.json not found" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp*"))
    assert not marker.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "missing shard": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp: checkpoint shard missing"),
    "truncated shard": (lambda d: _truncate(d / "__0_0.distcp"), "__0_0.distcp: checkpoint shard truncated"),
    "bad metadata": (lambda d: (d / DCP_METADATA_JSON).write_text("{\"format\": "),
                     "dcp_metadata.json: bad checkpoint metadata"),
    "bad train state": (lambda d: (d / "train_state.json").write_text("[]"), "train_state.json: unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, reference, damage, capsys):
    run = _copy(reference, tmp_path)
    step6 = run / "checkpoints" / "step_00000006"
    harm, expected = DAMAGE[damage]
    harm(step6)
    latest, warnings = find_resume_point(run / "checkpoints")
    assert latest.name == "step_00000003" and len(warnings) == 1 and expected in warnings[0], warnings
    summary = train(tiny_cfg(run))
    err = capsys.readouterr().err
    assert f"hibari: warning: skipping a damaged checkpoint: {step6}" in err and expected in err, err
    assert summary["resumed_from"].endswith("step_00000003")
    assert summary["losses"] == {s: reference[1][s] for s in (4, 5, 6)}  # bit for bit after the fallback
    verify_checkpoint(step6)  # the damaged step was written again


def test_every_checkpoint_damaged_is_one_line(tmp_path, reference):
    run = _copy(reference, tmp_path)
    for step in ("step_00000003", "step_00000006"):
        (run / "checkpoints" / step / "__0_0.distcp").unlink()
    with pytest.raises(HibariError) as err:
        train(tiny_cfg(run))
    msg = str(err.value)
    assert msg.startswith("no usable checkpoint in") and "__0_0.distcp: checkpoint shard missing" in msg
    assert "\n" not in msg


def _limit_file_size():
    # the process may not write a file larger than 64 KiB: the first checkpoint shard (~350 KB) hits a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_during_save_is_one_line(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "tiny.yaml"), f"run.dir={run}",
           "train.steps=4", "checkpoint.interval=2", "model.n_layers=2", "train.eval_interval=0", "log.plot=false",
           "log.progress=false"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("hibari: error: saving checkpoint step 2 failed: "), line
    assert "__0_0.distcp: File too large" in line and "no checkpoint was written yet" in line
    assert "rerun" not in line
    assert not [p for p in (run / "checkpoints").iterdir() if p.name != "latest"]  # no torn step left behind
