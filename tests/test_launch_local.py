"""`hibari launch local`: a 4-process DP2xTP2 run loses a rank (SIGKILL) -> the launcher fails naming it; the rerun
resumes from `latest`; the DP2xTP2 checkpoint then resumes at PP2 (2 processes) and in 1 process; a PP2
checkpoint resumes bit for bit. Signals to the launcher (SIGUSR1, SIGTERM, Ctrl-C once and twice, kill -9) and a
failing rank's report, each on a real 2-process run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# constant LR: the loss sequence after a resume must not depend on anything but the checkpoint
COMMON = ["train.steps=8", "model.n_layers=2", "checkpoint.interval=2", "checkpoint.keep_last=10", "lr.schedule=constant",
          "lr.warmup_steps=0", "lr.lr=2e-3", "train.eval_interval=0", "log.plot=false"]

pytestmark = pytest.mark.slow


def _launch(nproc, run_dir, *extra):
    return [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", str(nproc), str(TINY),
            f"run.dir={run_dir}", *COMMON, *extra]


def _metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The kill / resume / reshard sequence, once for the module (process launches dominate the test time)."""
    tmp_path = tmp_path_factory.mktemp("launch")
    run = tmp_path / "dp2tp2"
    cmd = _launch(4, run, "parallel.tp=2")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 400
    while not any(r["step"] >= 3 for r in _metrics(run)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the 4-process run made no progress"
        time.sleep(0.05)
    pid = int((run / "pids" / "rank_00002.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("hibari: error: rank 2 ") and "SIGKILL" in last, err[-2000:]
    # the stopped ranks' broken connections are consequences, not news; no agent log lines either
    assert "Connection closed" not in err and "torch.distributed" not in err and "Traceback" not in err, err[-3000:]
    done_before = max(r["step"] for r in _metrics(run))
    assert done_before < 8

    # the same command again resumes from the newest complete checkpoint and finishes
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hibari: resuming from" in r.stdout
    resumed_at = int(r.stdout.split("hibari: resuming from")[1].split("(step ")[1].split(")")[0])
    assert 2 <= resumed_at <= done_before
    ref = {rec["step"]: rec["loss"] for rec in _metrics(run)}
    assert sorted(ref) == list(range(1, 9))
    assert ref[8] < ref[1]

    # reshard: the DP2xTP2 step-4 checkpoint (model + optimizer) continues at PP2 and in one process
    for name, launch_args in [("pp2", ["parallel.tp=1", "parallel.pp=2", "checkpoint.async_save=true"]), ("single", None)]:
        other = tmp_path / name
        (other / "checkpoints").mkdir(parents=True)
        shutil.copytree(run / "checkpoints" / "step_00000004", other / "checkpoints" / "step_00000004")
        if launch_args is not None:
            r = subprocess.run(_launch(2, other, *launch_args), cwd=REPO, capture_output=True, text=True,
                               env=_env(), timeout=400)
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            from hibari.config import load_config
            from megatron_ext.train.config import TrainConfig
            from megatron_ext.train.loop import train

            train(load_config(TrainConfig, TINY, [f"run.dir={other}", *COMMON, "log.progress=false"]))
        got = {rec["step"]: rec["loss"] for rec in _metrics(other)}
        assert sorted(got) == [5, 6, 7, 8], name
        for step in got:
            assert got[step] == pytest.approx(ref[step], abs=2e-4), (name, step, got[step], ref[step])

    return tmp_path


def test_kill_a_rank_resume_and_reshard(runs):
    # the assertions run inside the fixture (in order); here: every run left its final checkpoint
    for name in ("dp2tp2", "pp2", "single"):
        assert (runs / name / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_pp2_checkpoint_resumes_bitwise(runs):
    """Bitwise resume at a 2-rank layout: the PP2 run's own (async-saved) step 6 -> steps 7, 8 bit for bit."""
    pp2 = {rec["step"]: rec["loss"] for rec in _metrics(runs / "pp2")}
    again = runs / "pp2-again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "pp2" / "checkpoints" / "step_00000006", again / "checkpoints" / "step_00000006")
    r = subprocess.run(_launch(2, again, "parallel.tp=1", "parallel.pp=2"), cwd=REPO, capture_output=True,
                       text=True, env=_env(), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {rec["step"]: rec["loss"] for rec in _metrics(again)} == {7: pp2[7], 8: pp2[8]}


# ----------------------------------------------------------------------------------------------------------------
# signals: a real 2-process run gets each signal once it trains (its SIGUSR1 handler is installed)

SIGNAL_RUN = ["train.steps=400", "model.n_layers=2", "checkpoint.interval=0", "train.eval_interval=0",
              "log.plot=false", "log.progress=false"]


def _rank_pids(run_dir) -> list[int]:
    return [int(p.read_text().split()[0]) for p in sorted((Path(run_dir) / "pids").glob("rank_*.pid"))]


def _alive(pid: int) -> bool:
    """Running, not a zombie (a reparented rank may wait for a reaper that never comes in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_and_wait_for_training(run_dir, *extra, after_step: int = 0):
    """`launch local --nproc 2` with the overrides AFTER the options (any order is accepted); returns once both ranks
    of this run published their pid and rank 0 logged a step after `after_step`."""
    cmd = [sys.executable, "-m", "launch.cli", "launch", "local", str(TINY), "--nproc", "2", f"run.dir={run_dir}",
           *SIGNAL_RUN, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300

    def training() -> bool:
        pids = _rank_pids(run_dir)
        steps = [r["step"] for r in _metrics(run_dir)]
        return len(pids) == 2 and all(map(_alive, pids)) and bool(steps) and max(steps) > after_step

    while not training():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the 2-process run made no progress"
        time.sleep(0.05)
    return proc, _rank_pids(run_dir)


def _wait_gone(pids, timeout=30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _latest_step(run_dir) -> int:
    name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    return int(name.split("_")[1])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_usr1_and_term_checkpoint_stop_and_exit_0(tmp_path, sig):
    run = tmp_path / "run"
    proc, pids = _start_and_wait_for_training(run)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert not _wait_gone(pids)
    step = _latest_step(run)
    assert f"stopped at step {step}" in out  # the rank 0 line (checkpoint saved)
    assert 1 <= step < 400 and max(r["step"] for r in _metrics(run)) == step
    assert "Traceback" not in err and "Connection closed" not in err
    # the pid files hold the pid only
    assert all(p.read_text().strip().isdigit() for p in (run / "pids").glob("rank_*.pid"))


def test_ctrl_c_saves_then_second_ctrl_c_stops_at_once(tmp_path):
    run = tmp_path / "run"
    proc, pids = _start_and_wait_for_training(run)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    step = _latest_step(run)
    assert err.strip().splitlines()[-1] == f"hibari: interrupted, saved step {step}"
    assert not _wait_gone(pids)

    # the rerun resumes from that step; two Ctrl-C in a row stop every rank without waiting for a checkpoint
    proc, pids = _start_and_wait_for_training(run, after_step=step)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "hibari: resuming from" in out and f"(step {step})" in out
    assert err.strip().splitlines()[-1].startswith("hibari: interrupted again: stopped every rank without saving")
    assert not _wait_gone(pids, timeout=10)
    # the second Ctrl-C does not wait for a save; a save the first one started may still have finished in the
    # milliseconds between them (a tiny model's step is that short), and then it is complete (`latest` moves last)
    assert _latest_step(run) >= step


def test_no_rank_outlives_a_killed_launcher(tmp_path):
    proc, pids = _start_and_wait_for_training(tmp_path / "run")
    proc.kill()  # SIGKILL: the launcher can do nothing; the ranks must go by themselves
    proc.communicate(timeout=30)
    assert not _wait_gone(pids, timeout=20), "ranks outlived the launcher"


def test_failing_rank_error_is_shown_once_then_the_launcher_line(tmp_path):
    """Every rank hits the same non-finite loss: one copy of the error, then the launcher's line; no gloo noise from
    the ranks that were stopped, no launcher-agent log lines."""
    r = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "2", str(TINY),
                        f"run.dir={tmp_path / 'run'}", *SIGNAL_RUN, "lr.lr=1e30", "lr.warmup_steps=0"],
                       cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("hibari: error: step ") and "loss is nan" in lines[0]
    assert lines[1].startswith("hibari: error: rank ") and "exited with code 2; the error above" in lines[1]
    assert "rerun the same command" not in lines[1]  # an input error: rerunning would fail the same way


def test_more_ranks_than_gpus_fails_before_starting(tmp_path, monkeypatch, capsys):
    """With CUDA the ranks use NCCL, one GPU each: `--nproc 2` on a (pretended) 1-GPU machine is one line, exit 2."""
    import torch

    from launch.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["launch", "local", "--nproc", "2", str(TINY), f"run.dir={tmp_path / 'run'}", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hibari: error: 2 ranks per node but this node has 1 GPU"), err
    assert not (tmp_path / "run").exists()
