"""`hibari train` (one real process) and its signals: SIGTERM/SIGUSR1 = checkpoint + exit 0; Ctrl-C once =
checkpoint + `hibari: interrupted, saved step N`; twice = stop at once; a launched rank dies with its parent."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ARGS = ["train.steps=100000", "model.n_layers=2", "checkpoint.interval=0", "train.eval_interval=0", "log.plot=false",
        "log.progress=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_PROCID")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _steps(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def _start(run, extra=(), **env):
    cmd = [sys.executable, "-m", "launch.cli", "train", str(TINY), f"run.dir={run}", *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def _wait_training(proc, run, steps=2, timeout=240):
    deadline = time.monotonic() + timeout
    while _steps(run) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def _latest(run):
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_and_exits_0(tmp_path, sig):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_training(proc, run)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = _steps(run)
    assert f"hibari: stopped at step {step} on {sig} (checkpoint saved)" in out, out
    assert _latest(run) == f"step_{step:08d}"
    assert "Traceback" not in err


def test_ctrl_c_once_saves_then_twice_stops_at_once(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_training(proc, run)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = _steps(run)
    assert f"hibari: interrupted, saved step {step}" in out, (out, err)
    assert _latest(run) == f"step_{step:08d}"
    assert "internal error" not in err and "Traceback" not in err

    # twice: the second Ctrl-C stops at once (no save), one line, no traceback. Slower steps (a wider model) so
    # the second signal lands while the first is still waiting for its step to end.
    run2 = tmp_path / "run2"
    proc = _start(run2, extra=["model.dim=512", "model.ffn_hidden_dim=1024", "train.seq_length=256"])
    _wait_training(proc, run2, steps=1)
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    while first and "Ctrl-C again" not in first:
        first = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "hibari: interrupted" in err and "Traceback" not in err and "internal error" not in err, err
    assert "saved step" not in out and not (run2 / "checkpoints" / "latest").exists()


def test_launched_rank_dies_with_its_parent(tmp_path):
    """A rank started by a launcher (LOCAL_RANK set) is killed by the kernel when the launcher dies (kill -9)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    run = tmp_path / "run"
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'launch.cli', 'train', {str(TINY)!r}, 'run.dir={run}', "
        f"*{ARGS!r}])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=_env(LOCAL_RANK="0", WORLD_SIZE="1", RANK="0"))
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 240
        while _steps(run) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as f:  # a zombie waiting for its reaper has exited too
                if f.read().split(") ")[-1].startswith("Z"):
                    break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the rank outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
