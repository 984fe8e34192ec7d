"""`hibari launch slurm`: multi-node training as one SLURM batch job, with requeue and automatic resume.

Design (see the README section "Training on SLURM"):
- One srun task per GPU (per rank), not one torch elastic launcher per node. SLURM already is the process
  manager: it starts every rank, gives it SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, delivers the preemption signal to
  every rank, ends the step when a rank dies (`--kill-on-bad-exit`) and accounts per task. An elastic launcher per
  node would duplicate that, hide rank failures behind agent restarts, and need signal forwarding of its own.
- Each task runs `python -m launch.slurm rank -- python -m launch.cli train SNAPSHOT`: a small supervisor that sets
  the torchrun-style variables from SLURM's, writes the child's pid, forwards signals, and records how the rank
  ended (failed with a code / killed by a signal / stopped after a preemption warning) in the attempt's log dir.
- After srun returns, the batch script runs `python -m launch.slurm finish`: it names the first failed rank and its
  host in one line, or, after a preemption warning, requeues the job (`scontrol requeue`). The requeued job runs
  the same script; the training loop resumes from `<run.dir>/checkpoints/latest` by itself.
- MASTER_ADDR: the first host of the allocation, resolved through `scontrol show node` (NodeAddr), then the
  resolver, so node names that DNS does not know still work. MASTER_PORT = 15000 + job id mod 20000 (the same
  formula as `parallel.dist`), so two jobs sharing a node rarely collide and a requeued job keeps its port.

This module imports only the standard library and the config schema: `hibari --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hibari.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from hibari.errors import HibariError
from hibari.slurm import TERMINAL_STATES, find_sbatch, job_state, one_line, submit_script  # noqa: F401
from hibari.io import write_json

MASTER_PORT_BASE, MASTER_PORT_SPAN = SLURM_PORT_BASE, SLURM_PORT_SPAN  # the one rule, in hibari.env
DEFAULT_SIGNAL_SECONDS = 120  # preemption warning: time to finish a step and write a checkpoint

# environment defaults for the ranks; `${VAR:-default}` so the cluster's own settings win
NCCL_ENV_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", "a failed/hung collective tears the rank down instead of hanging"),
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "0", "no flight-recorder dumps by default"),
    ("NCCL_DEBUG", "WARN", "NCCL problems are logged, nothing else"),
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1", "orders TP/SP communication kernels before compute (Megatron practice)"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1", "frees FSDP communication buffers promptly"),
    ("PYTHONUNBUFFERED", "1", "per-rank logs appear as they are written"),
)


# --------------------------------------------------------------------------------------------------------------
# job description and sbatch rendering (pure functions)


@dataclass
class SlurmJobSpec:
    nodes: int
    tasks_per_node: int  # ranks per node (= GPUs per node on GPU clusters)
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    requeue: bool = False
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS  # 0: no preemption warning
    job_name: str = "hibari"
    sbatch_args: list[str] = field(default_factory=list)  # extra `--qos=...`-style options, passed verbatim

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self) -> None:
        if self.nodes < 1:
            raise HibariError(f"--nodes: expected a positive integer (got {self.nodes})")
        if self.tasks_per_node < 1:
            raise HibariError(f"--gpus-per-node/--tasks-per-node: expected a positive integer "
                              f"(got {self.tasks_per_node})")
        if self.gpus_per_node and self.gpus_per_node != self.tasks_per_node:
            raise HibariError(f"--gpus-per-node {self.gpus_per_node} and --tasks-per-node {self.tasks_per_node}: "
                              "hibari runs one rank per GPU, give one of them")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise HibariError(f"--cpus-per-task: expected a positive integer (got {self.cpus_per_task})")
        if self.signal_seconds < 0:
            raise HibariError(f"--signal-seconds: expected >= 0 (got {self.signal_seconds})")


def sbatch_directives(spec: SlurmJobSpec, log_dir: Path, workdir: Path) -> list[str]:
    d = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.gpus_per_node:
        d.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        d.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.partition:
        d.append(f"--partition={spec.partition}")
    if spec.account:
        d.append(f"--account={spec.account}")
    if spec.time:
        d.append(f"--time={spec.time}")
    d.append("--requeue" if spec.requeue else "--no-requeue")
    if spec.signal_seconds:
        # no `B:` prefix: SLURM signals every task of the job step (every rank), not the batch shell
        d.append(f"--signal=USR1@{spec.signal_seconds}")
    d += [f"--output={log_dir}/job-%j.log", "--open-mode=append", f"--chdir={workdir}"]
    d += list(spec.sbatch_args)
    return d


def train_command(config_snapshot: Path, python: str = sys.executable) -> list[str]:
    """What every rank runs: `hibari train` on the config snapshot (the same interpreter/venv as the submitter)."""
    return [python, "-m", "launch.cli", "train", str(config_snapshot)]


def render_sbatch(spec: SlurmJobSpec, run_dir: Path, rank_command: list[str], workdir: Path,
                  python: str = sys.executable) -> str:
    """The batch script for one training job. Every attempt (requeue) logs to its own directory."""
    log_dir = Path(run_dir) / "slurm"
    py = shlex.quote(python)
    lines = ["#!/bin/bash", "# generated by `hibari launch slurm`; resubmit with `sbatch` or `hibari launch slurm`"]
    lines += [f"#SBATCH {x}" for x in sbatch_directives(spec, log_dir, workdir)]
    env_defaults = "\n".join(f'export {name}="${{{name}:-{value}}}"  # {why}'
                             for name, value, why in NCCL_ENV_DEFAULTS)
    lines.append(f"""
set -uo pipefail
ATTEMPT="${{SLURM_RESTART_COUNT:-0}}"
export HIBARI_SLURM_LOG_DIR="{log_dir}/$SLURM_JOB_ID/attempt-$ATTEMPT"
mkdir -p "$HIBARI_SLURM_LOG_DIR"

# rendezvous: first host of the allocation, by address (node names need not resolve)
FIRST_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node "$FIRST_HOST" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)"
if [ -z "$MASTER_ADDR" ] || [ "$MASTER_ADDR" = "$FIRST_HOST" ]; then
    MASTER_ADDR="$(getent hosts "$FIRST_HOST" | awk '{{print $1; exit}}')"
fi
export MASTER_ADDR="${{MASTER_ADDR:-$FIRST_HOST}}"
export MASTER_PORT="$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % {MASTER_PORT_SPAN} ))"

{env_defaults}
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}"

echo "hibari: job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST: $SLURM_NTASKS ranks," \\
     "master $MASTER_ADDR:$MASTER_PORT, rank logs $HIBARI_SLURM_LOG_DIR/rank-<r>.log"
# srun does not inherit --cpus-per-task from sbatch on every SLURM version: pass it on
srun --kill-on-bad-exit=1 ${{SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}} \\
    --output="$HIBARI_SLURM_LOG_DIR/rank-%t.log" \\
    {py} -m launch.slurm rank -- {shlex.join(rank_command)}
SRUN_RC=$?
exec {py} -m launch.slurm finish --log-dir "$HIBARI_SLURM_LOG_DIR" --srun-rc "$SRUN_RC" \\
    {"--requeue" if spec.requeue else "--no-requeue"}
""")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# validation before submitting


def load_train_config(config: str, overrides: list[str]):
    """(validated TrainConfig, raw dict with the overrides applied). One-line error on a bad config."""
    from hibari.config import apply_overrides, read_yaml, validate

    data = apply_overrides(read_yaml(config), overrides)
    try:
        from megatron_ext.train.config import TrainConfig
    except ModuleNotFoundError:  # training package absent: still check the layout from the raw dict
        return None, data
    return validate(TrainConfig, json.loads(json.dumps(data)), source=str(config)), data


def check_world_size(cfg, data: dict, world_size: int) -> str:
    """Checks that `world_size` ranks factor into dp x pp x tp (and that the batch divides); returns a summary."""
    if cfg is not None:
        from megatron_ext.train.loop import plan  # the same checks `hibari train` runs before joining the group

        try:
            _, resolved, accum = plan(cfg, world_size)
        except HibariError as err:
            raise HibariError(f"{world_size} ranks (nodes x ranks per node): {err}") from None
        dp = resolved.dp_replicate * resolved.dp_shard
        return (f"world {world_size} = dp {dp} (replicate {resolved.dp_replicate} x shard {resolved.dp_shard}) x "
                f"tp {resolved.tp} x pp {resolved.pp}; grad accumulation {accum}")
    par = data.get("parallel") or {}
    tp, pp, rep, shard = (int(par.get(k, d)) for k, d in
                          (("tp", 1), ("pp", 1), ("dp_replicate", 1), ("dp_shard", -1)))
    fixed = tp * pp * rep
    if shard == -1 and world_size % fixed == 0:
        shard = world_size // fixed
    if shard < 1 or fixed * shard != world_size:
        raise HibariError(f"parallel: nodes x tasks per node = {world_size} ranks does not factor into "
                          f"dp_replicate x dp_shard x tp x pp = {rep} x {par.get('dp_shard', -1)} x {tp} x {pp}")
    return f"world {world_size} = dp {rep * shard} x tp {tp} x pp {pp}"


# --------------------------------------------------------------------------------------------------------------
# submission


def wait_for_job(job_id: int, poll_seconds: float = 1.0) -> str | None:
    """Block until the job has ended for good (a requeued job is pending again, so this waits across requeues)."""
    while True:
        state = job_state(job_id)
        if state is None or state in TERMINAL_STATES:
            return state
        time.sleep(poll_seconds)


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
    (log_dir / f"rank-{rank}.pid").write_text(f"{child.pid}\n")
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
    write_json(log_dir / _FAILED.format(rank=rank), record)
    how = f"was killed by {record['signal']}" if rc < 0 else f"exited with code {rc}"
    print(f"hibari: rank {rank} on {host} {how}", file=sys.stderr, flush=True)
    return record["exit_code"]




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
    return (f"rank {rec['rank']} on host {rec['host']} {how}{tail} "
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


# --------------------------------------------------------------------------------------------------------------
# the `hibari launch slurm` command


def register_slurm(sub) -> None:
    p = sub.add_parser(
        "slurm", help="submit a training run as a multi-node SLURM batch job (one rank per GPU)",
        description="Render an sbatch script from a training config, check that nodes x ranks per node factor into "
                    "dp x tp x pp, submit it and print the job id and log paths. With --requeue, a preemption "
                    "warning (USR1, --signal-seconds before the end) makes the run save a checkpoint and requeue; "
                    "the next attempt resumes from <run.dir>/checkpoints/latest.")
    p.add_argument("config", help="training config (YAML), as for `hibari train`")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides")
    p.add_argument("--nodes", type=int, required=True)
    per_node = p.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPUs per node; one rank per GPU")
    per_node.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU clusters (no GPUs requested)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--requeue", action="store_true",
                   help="on the preemption warning: checkpoint, then requeue the job (it resumes automatically)")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help=f"send the preemption warning (USR1) this long before the time limit (default "
                        f"{DEFAULT_SIGNAL_SECONDS}; 0: none)")
    p.add_argument("--job-name", default=None, help="default: hibari-<run dir name>")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing, write nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait until the job ends (also across requeues); exit non-zero if it failed")
    p.set_defaults(func=_launch_slurm)


def _launch_slurm(args) -> int:
    cfg, data = load_train_config(args.config, args.overrides)
    run_dir_raw = (data.get("run") or {}).get("dir")
    if not run_dir_raw:
        raise HibariError(f"{args.config}: field run.dir: required (the run directory holds logs and checkpoints)")
    run_dir = Path(run_dir_raw).resolve()
    tasks = args.gpus_per_node or args.tasks_per_node
    spec = SlurmJobSpec(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node or 0,
                        partition=args.partition, account=args.account, time=args.time,
                        cpus_per_task=args.cpus_per_task, requeue=args.requeue, signal_seconds=args.signal_seconds,
                        job_name=args.job_name or f"hibari-{run_dir.name}", sbatch_args=list(args.sbatch_arg))
    spec.check()
    layout = check_world_size(cfg, data, spec.world_size)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    snapshot = run_dir / "slurm" / f"config-{stamp}.yaml"
    script_path = run_dir / "slurm" / f"submit-{stamp}.sbatch"
    script = render_sbatch(spec, run_dir, train_command(snapshot), Path.cwd())
    if args.dry_run:
        print(f"# {layout}")
        print(f"# would write {snapshot} (config with overrides) and {script_path}")
        print(script)
        return 0
    find_sbatch()  # before writing anything
    from hibari.config import dump_config

    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        dump_config(cfg, snapshot)
    else:
        import yaml

        snapshot.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    script_path.write_text(script, encoding="utf-8")
    job_id = submit_script(script_path)
    print(f"submitted job {job_id} ({layout})")
    print(f"  batch log: {run_dir / 'slurm' / f'job-{job_id}.log'}")
    print(f"  rank logs: {run_dir / 'slurm' / str(job_id) / 'attempt-<n>' / 'rank-<r>.log'}")
    print(f"  script:    {script_path}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return report_job(job_id, run_dir, wait_for_job(job_id))


def report_job(job_id: int, run_dir: Path, state: str | None = None) -> int:
    """After `--wait`: 0 when the last attempt finished cleanly, else a HibariError naming the failed rank."""
    job_dir = Path(run_dir) / "slurm" / str(job_id)
    attempts = sorted(job_dir.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    batch_log = Path(run_dir) / "slurm" / f"job-{job_id}.log"
    if not attempts:
        raise HibariError(f"job {job_id} ended ({state or 'state unknown'}) before starting a rank (see {batch_log})")
    last = attempts[-1]
    outcome = read_outcome(last)
    if outcome.get("outcome") == "finished":
        n = len(attempts)
        print(f"job {job_id} finished ({n} attempt{'s' if n > 1 else ''})")
        return 0
    failure = first_failure(last)
    if failure is not None and failure.get("terminated_by_slurm"):
        raise HibariError(f"job {job_id} was stopped by SLURM (state {state or 'unknown'}: cancelled, time limit "
                          f"or node failure); every rank was terminated; resubmit to resume (see {batch_log})")
    if failure is not None:
        raise HibariError(f"job {job_id} failed: {describe_failure(failure, last)}")
    raise HibariError(f"job {job_id} did not finish cleanly (state {state or 'unknown'}, "
                      f"outcome {outcome.get('outcome', 'none')}; see {batch_log})")


def read_outcome(attempt_dir: Path) -> dict:
    path = Path(attempt_dir) / OUTCOME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------------------
# entry points used inside the job: `python -m launch.slurm rank -- CMD...` and `python -m launch.slurm finish`


def _main(argv: list[str]) -> int:
    if argv[:1] == ["rank"]:
        cmd = argv[1:]
        if cmd[:1] == ["--"]:
            cmd = cmd[1:]
        if not cmd:
            print("usage: python -m launch.slurm rank -- COMMAND...", file=sys.stderr)
            return 2
        return rank_main(cmd)
    p = argparse.ArgumentParser(prog="python -m launch.slurm")
    s = p.add_subparsers(dest="what", required=True)
    f = s.add_parser("finish")
    f.add_argument("--log-dir", required=True, type=Path)
    f.add_argument("--srun-rc", required=True, type=int)
    f.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    return finish_main(a.log_dir, a.srun_rc, a.requeue)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
