"""Inside a `hibari launch slurm` job: the per-rank supervisor and the end-of-attempt report.

- `python -m launch.slurm_supervisor rank -- CMD...` runs in every srun task: sets the torchrun-style variables from
  SLURM's, writes the child's pid (the pid only) to `rank-<r>.pid`, forwards signals, and records how the rank ended
  (failed with a code / killed by a signal / stopped after a preemption warning) in the attempt's log dir.
- `python -m launch.slurm_supervisor finish` runs after srun returns: it names the first failed rank and its host in
  one line, or, after a preemption warning, requeues the job (`scontrol requeue`); the requeued job runs the same
  script and the training loop resumes from `<run.dir>/checkpoints/latest` by itself.

Submission (rendering the batch script, checks, `sbatch`) is in `launch/slurm_submit.py`. This module imports only
the standard library and `hibari`: it starts before every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hibari.io import write_json
from hibari.slurm import one_line
from launch.cli import RANK_ERROR_FILE_ENV

# --------------------------------------------------------------------------------------------------------------
# rank supervisor and end-of-job report (run inside the job)

_FAILED = "failed-rank-{rank}.json"
_PREEMPTED = "preempted-rank-{rank}.json"
OUTCOME = "outcome.json"  # written by `finish`: finished | failed | requeued | stopped


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def rank_main(cmd: list[str]) -> int:
    """Run one rank's command under SLURM: torchrun-style env, pid file, signal forwarding, outcome markers."""
    env = os.environ
    rank = int(env.get("SLURM_PROCID", "0"))
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    log_dir = Path(env.get("HIBARI_SLURM_LOG_DIR", "."))
    child_env = dict(env)
    child_env.update(RANK=str(rank), WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                     LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                     LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0],
                     HIBARI_RANK_HOST=host)
    error_file = log_dir / f"rank-{rank}.error"  # the rank's one-line error, for the end-of-job report
    error_file.unlink(missing_ok=True)
    child_env[RANK_ERROR_FILE_ENV] = str(error_file)
    received: list[int] = []
    state = {"child": None}

    def forward(signum, _frame):
        received.append(signum)
        child = state["child"]
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
        signal.signal(sig, forward)

    def child_setup():  # the child ignores USR1 until the training loop installs its handler (default: exit)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    started = time.time()
    child = subprocess.Popen(cmd, env=child_env, preexec_fn=child_setup)
    state["child"] = child
    (log_dir / f"rank-{rank}.pid").write_text(f"{child.pid}\n")  # the pid only: `kill $(cat rank-3.pid)`
    print(f"hibari: rank {rank} on {host}: pid {child.pid}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    while True:
        try:
            rc = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue
    ended = time.time()
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = usage.ru_utime + usage.ru_stime
    print(f"hibari: rank {rank} on {host}: exit status {rc}, {ended - started:.1f}s wall, {cpu_s:.1f}s CPU, "
          f"max RSS {usage.ru_maxrss / 1024:.0f} MiB", file=sys.stderr, flush=True)
    record = {"rank": rank, "host": host, "pid": child.pid, "started": started, "ended": ended,
              "cpu_s": round(cpu_s, 2), "signals_received": [_signal_name(s) for s in received]}
    if rc == 0:
        if signal.SIGUSR1 in received:  # stopped (checkpointed) after a preemption warning
            write_json(log_dir / _PREEMPTED.format(rank=rank), record)
        return 0
    if rc < 0:
        record.update(signal=_signal_name(-rc), exit_code=128 - rc)
    else:
        record.update(exit_code=rc)
    # ended because SLURM stopped the step (another rank failed, cancel, time limit): not the first failure
    record["terminated_by_slurm"] = any(s in (signal.SIGTERM, signal.SIGINT) for s in received)
    error = _first_line(error_file)
    if error:
        record["error"] = error
        print(error, file=sys.stderr, flush=True)  # into this rank's log, where the rest of its output is
    write_json(log_dir / _FAILED.format(rank=rank), record)
    how = f"was killed by {record['signal']}" if rc < 0 else f"exited with code {rc}"
    print(f"hibari: rank {rank} on {host} {how}", file=sys.stderr, flush=True)
    return record["exit_code"]


def _first_line(path: Path) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
    except OSError:
        return None
    return lines[0] if lines else None


def first_failure(log_dir: Path) -> dict | None:
    """The rank that failed first: ranks stopped by SLURM afterwards and later failures are consequences."""
    records = []
    for path in Path(log_dir).glob("failed-rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    records.sort(key=lambda r: (r.get("terminated_by_slurm", False), r.get("ended", 0.0)))
    first = dict(records[0])
    first["other_failed_ranks"] = sorted(r["rank"] for r in records[1:])
    return first


def describe_failure(rec: dict, log_dir: Path) -> str:
    how = f"was killed by {rec['signal']}" if rec.get("signal") else f"exited with code {rec.get('exit_code')}"
    others = rec.get("other_failed_ranks") or []
    tail = f"; ranks {', '.join(map(str, others))} stopped after it" if others else ""
    error = rec.get("error") or ""
    for prefix in ("hibari: error: ", "hibari: "):
        if error.startswith(prefix):
            error = error[len(prefix):]
            break
    said = f": {error}" if error else ""
    return (f"rank {rec['rank']} on host {rec['host']} {how}{said}{tail} "
            f"(log: {Path(log_dir) / ('rank-%d.log' % rec['rank'])})")


def finish_main(log_dir: Path, srun_rc: int, requeue: bool) -> int:
    """End of the batch script: one clear line about how the attempt ended; requeue after a preemption warning."""
    job = os.environ.get("SLURM_JOB_ID", "?")
    preempted = sorted(Path(log_dir).glob("preempted-rank-*.json"))
    failure = first_failure(log_dir)

    def outcome(what: str, **extra) -> None:
        write_json(Path(log_dir) / OUTCOME, {"outcome": what, "srun_rc": srun_rc, **extra})

    if srun_rc == 0 and preempted:
        if not requeue:
            outcome("stopped")
            print(f"hibari: job {job} stopped after the preemption warning with a checkpoint; the job was "
                  "submitted without --requeue: resubmit the same command to resume", flush=True)
            return 0
        print(f"hibari: job {job} saved a checkpoint after the preemption warning; requeueing "
              "(the next attempt resumes from checkpoints/latest)", flush=True)
        outcome("requeued")
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            outcome("requeue-failed")
            print(f"hibari: error: scontrol requeue {job} failed: {one_line(proc.stderr + proc.stdout)}; "
                  "resubmit to resume", flush=True)
            return 1
        return 0
    if srun_rc == 0:
        outcome("finished")
        print(f"hibari: job {job} finished: all ranks exited with code 0", flush=True)
        return 0
    outcome("failed", first_failure=failure)
    if failure is None:
        print(f"hibari: error: job {job} failed: srun exited with code {srun_rc} before a rank reported "
              f"(see the batch log and {log_dir})", flush=True)
        return srun_rc
    line = describe_failure(failure, log_dir)
    print(f"hibari: error: job {job} failed: {line}", flush=True)
    return srun_rc


def read_outcome(attempt_dir: Path) -> dict:
    path = Path(attempt_dir) / OUTCOME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------------------
# entry points used inside the job: `python -m launch.slurm_supervisor rank -- CMD...` and `... finish`


def _main(argv: list[str]) -> int:
    if argv[:1] == ["rank"]:
        cmd = argv[1:]
        if cmd[:1] == ["--"]:
            cmd = cmd[1:]
        if not cmd:
            print("usage: python -m launch.slurm_supervisor rank -- COMMAND...", file=sys.stderr)
            return 2
        return rank_main(cmd)
    p = argparse.ArgumentParser(prog="python -m launch.slurm_supervisor")
    s = p.add_subparsers(dest="what", required=True)
    f = s.add_parser("finish")
    f.add_argument("--log-dir", required=True, type=Path)
    f.add_argument("--srun-rc", required=True, type=int)
    f.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    return finish_main(a.log_dir, a.srun_rc, a.requeue)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
