"""`hibari launch slurm`: submit multi-node training as one SLURM batch job, with requeue and automatic resume.

Design (README, "hibari launch slurm"):
- One srun task per GPU (per rank), not one torch elastic launcher per node. SLURM already is the process
  manager: it starts every rank, gives it SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, delivers the preemption signal to
  every rank, ends the step when a rank dies (`--kill-on-bad-exit`) and accounts per task. An elastic launcher per
  node would duplicate that, hide rank failures behind agent restarts, and need signal forwarding of its own.
- Each task runs `python -m launch.slurm_supervisor rank -- python -m launch.cli train SNAPSHOT`, and after srun
  returns the batch script runs `python -m launch.slurm_supervisor finish` (both in `launch/slurm_supervisor.py`).
- MASTER_ADDR: the first host of the allocation, resolved through `scontrol show node` (NodeAddr), then the
  resolver, so node names that DNS does not know still work. MASTER_PORT = 15000 + job id mod 20000 (the rule of
  `hibari.env`), so two jobs sharing a node rarely collide and a requeued job keeps its port.
- Every value written into the batch script is shell-quoted (a run directory named `$(...)` stays a name) and the
  job name is reduced to letters, digits and `._-`.

Module level imports only the standard library and `hibari`: `hibari --help` stays fast.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hibari.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from hibari.errors import HibariError
from hibari.slurm import TERMINAL_STATES, find_sbatch, job_state, submit_script
from launch.slurm_supervisor import describe_failure, first_failure, read_outcome

MASTER_PORT_BASE, MASTER_PORT_SPAN = SLURM_PORT_BASE, SLURM_PORT_SPAN  # the one rule, in hibari.env
DEFAULT_SIGNAL_SECONDS = 120  # preemption warning: time to finish a step and write a checkpoint
SUPERVISOR_MODULE = "launch.slurm_supervisor"

# environment defaults for the ranks; `${VAR:-default}` so the cluster's own settings win
NCCL_ENV_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", "a failed/hung collective tears the rank down instead of hanging"),
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "0", "no flight-recorder dumps by default"),
    ("NCCL_DEBUG", "WARN", "NCCL problems are logged, nothing else"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1", "frees FSDP communication buffers promptly"),
    ("PYTHONUNBUFFERED", "1", "per-rank logs appear as they are written"),
)
_JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------------------------------------------
# job description and sbatch rendering (pure functions)


def sanitize_job_name(name: str) -> str:
    """A job name squeue, log names and shells all take as it is: letters, digits, `._-`, at most 64 characters."""
    cleaned = re.sub("-{2,}", "-", _JOB_NAME_UNSAFE.sub("-", name)).strip("-.")[:64]
    return cleaned or "hibari"


def quote(value) -> str:
    """One shell word (and one `#SBATCH` word: sbatch strips the same quotes). A newline cannot be made safe in a
    directive line, so it is refused."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise HibariError(f"{text!r}: a value put into the batch script cannot contain a line break")
    return shlex.quote(text)


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
    """`#SBATCH` options, each one quoted word."""
    d = [f"--job-name={sanitize_job_name(spec.job_name)}", f"--nodes={spec.nodes}",
         f"--ntasks-per-node={spec.tasks_per_node}"]
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
    return [quote(x) for x in d]


def train_command(config_snapshot: Path, python: str = sys.executable) -> list[str]:
    """What every rank runs: `hibari train` on the config snapshot (the same interpreter/venv as the submitter)."""
    return [python, "-m", "launch.cli", "train", str(config_snapshot)]


def render_sbatch(spec: SlurmJobSpec, run_dir: Path, rank_command: list[str], workdir: Path,
                  python: str = sys.executable, gpu_env: dict[str, str] | None = None) -> str:
    """The batch script for one training job. Every attempt (requeue) logs to its own directory. Values from the
    user (paths, names, options) appear only as quoted words: the script runs nothing they contain."""
    log_dir = Path(run_dir) / "slurm"
    py = quote(python)
    lines = ["#!/bin/bash", "# generated by `hibari launch slurm`; resubmit with `sbatch` or `hibari launch slurm`"]
    lines += [f"#SBATCH {x}" for x in sbatch_directives(spec, log_dir, workdir)]
    defaults = list(NCCL_ENV_DEFAULTS) + [(name, value, "layout-dependent GPU default (parallel.dist.cuda_env)")
                                          for name, value in (gpu_env or {}).items()]
    env_defaults = "\n".join(f'export {name}="${{{name}:-{value}}}"  # {why}' for name, value, why in defaults)
    rank_words = " ".join(quote(w) for w in rank_command)
    lines.append(f"""
set -uo pipefail
ATTEMPT="${{SLURM_RESTART_COUNT:-0}}"
export HIBARI_SLURM_LOG_DIR={quote(log_dir)}"/$SLURM_JOB_ID/attempt-$ATTEMPT"
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
    {py} -m {SUPERVISOR_MODULE} rank -- {rank_words}
SRUN_RC=$?
exec {py} -m {SUPERVISOR_MODULE} finish --log-dir "$HIBARI_SLURM_LOG_DIR" --srun-rc "$SRUN_RC" \\
    {"--requeue" if spec.requeue else "--no-requeue"}
""")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# checks before submitting


def check_world_size(cfg, world_size: int, scan_tokens: bool = False) -> list[str]:
    """The pre-flight `hibari train` runs before joining the group, for `world_size` ranks: the layout summary and
    notes, one line each."""
    from launch.preflight import check_run

    try:
        return check_run(cfg, world_size, scan_tokens=scan_tokens)
    except HibariError as err:
        raise HibariError(f"{world_size} ranks (nodes x ranks per node): {err}") from None


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
# the `hibari launch slurm` command


def register_slurm(sub) -> None:
    p = sub.add_parser(
        "slurm", help="submit a training run as a multi-node SLURM batch job (one rank per GPU)",
        description="Run the pre-flight for nodes x ranks per node, render an sbatch script from a training config, "
                    "submit it and print the job id and log paths. With --requeue, a preemption "
                    "warning (USR1, --signal-seconds before the end) makes the run save a checkpoint and requeue; "
                    "the next attempt resumes from <run.dir>/checkpoints/latest.")
    p.add_argument("config", help="training config (YAML), as for `hibari train`")
    p.add_argument("overrides", nargs="*", metavar="a.b=v",
                   help="config overrides, anywhere on the command line")
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
    p.add_argument("--dry-run", action="store_true",
                   help="run the pre-flight checks and print the batch script; submit nothing, write nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait until the job ends (also across requeues); exit non-zero if it failed")
    p.set_defaults(func=_launch_slurm)


def _launch_slurm(args) -> int:
    from hibari.config import load_config
    from megatron_ext.train.config import TrainConfig
    from parallel.dist import cuda_env

    cfg = load_config(TrainConfig, args.config, args.overrides)
    run_dir = Path(cfg.run.dir).resolve()
    tasks = args.gpus_per_node or args.tasks_per_node
    spec = SlurmJobSpec(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node or 0,
                        partition=args.partition, account=args.account, time=args.time,
                        cpus_per_task=args.cpus_per_task, requeue=args.requeue, signal_seconds=args.signal_seconds,
                        job_name=args.job_name or f"hibari-{run_dir.name}", sbatch_args=list(args.sbatch_arg))
    spec.check()
    notes = check_world_size(cfg, spec.world_size, scan_tokens=args.dry_run)
    layout = notes[0]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    snapshot = run_dir / "slurm" / f"config-{stamp}.yaml"
    script_path = run_dir / "slurm" / f"submit-{stamp}.sbatch"
    tp = cfg.parallel.tp
    gpu_env = cuda_env(tp=tp, dp=spec.world_size // (tp * cfg.parallel.pp)) if spec.gpus_per_node else None
    script = render_sbatch(spec, run_dir, train_command(snapshot), Path.cwd(), gpu_env=gpu_env)
    if args.dry_run:
        for note in notes:
            print(f"# {note}")
        print(f"# would write {snapshot} (config with overrides) and {script_path}")
        print(script)
        return 0
    find_sbatch()  # before writing anything
    from hibari.config import dump_config

    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, snapshot)
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
