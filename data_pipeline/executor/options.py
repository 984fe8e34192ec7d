"""Command-line options of the executor (`--executor local|slurm`, `--slurm-*`) and the runner they select.

Shared by `hibari corpus clean`, `hibari corpus dedup` and `hibari data tokenize`: each passes
`runner=make_runner(args)` to its stage function (the one way to choose where tasks run).
"""

from __future__ import annotations

from hibari.errors import HibariError
from hibari.slurm import find_sbatch

from data_pipeline.executor.local import run_local


def add_executor_arguments(parser, with_executor_choice: bool = True) -> None:
    """Adds `--executor local|slurm` (unless the parser has it already) and the `--slurm-*` options."""
    g = parser.add_argument_group("executor (--executor local|slurm)")
    if with_executor_choice:
        g.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: process pool on this machine (--workers); slurm: one array element per range "
                            "of shards")
    g.add_argument("--slurm-partition")
    g.add_argument("--slurm-account")
    g.add_argument("--slurm-time", help="time limit per array element, e.g. 4:00:00")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1)
    g.add_argument("--slurm-mem", help="memory per array element, e.g. 8G")
    g.add_argument("--slurm-max-array-size", type=int, default=1000,
                   help="array elements per job (tasks are grouped into this many contiguous ranges)")
    g.add_argument("--slurm-max-running", type=int, help="at most this many elements at once")
    g.add_argument("--slurm-retries", type=int, default=2, help="resubmissions of failed/missing tasks")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --slurm-arg=--qos=low (repeatable)")


def slurm_options_from_args(args):
    from data_pipeline.executor.slurm import SlurmArrayOptions

    for name in ("slurm_cpus_per_task", "slurm_max_array_size"):
        if getattr(args, name) < 1:
            raise HibariError(f"--{name.replace('_', '-')}: expected a positive integer (got {getattr(args, name)})")
    if args.slurm_retries < 0:
        raise HibariError(f"--slurm-retries: expected >= 0 (got {args.slurm_retries})")
    if args.slurm_max_running is not None and args.slurm_max_running < 1:
        raise HibariError(f"--slurm-max-running: expected a positive integer (got {args.slurm_max_running})")
    return SlurmArrayOptions(partition=args.slurm_partition, account=args.slurm_account, time=args.slurm_time,
                             cpus_per_task=args.slurm_cpus_per_task, mem=args.slurm_mem,
                             max_array_size=args.slurm_max_array_size, max_running=args.slurm_max_running,
                             retries=args.slurm_retries, sbatch_args=list(args.slurm_arg))


def make_runner(args):
    """`run_local`, or a `run_slurm` with the command line's options: both take (tasks, state_dir, workers, desc,
    show_progress). SLURM problems (no sbatch, bad options) fail here, before any work."""
    if getattr(args, "executor", "local") != "slurm":
        return run_local
    from data_pipeline.executor.slurm import run_slurm

    opts = slurm_options_from_args(args)
    find_sbatch("--executor slurm needs them, or use --executor local")

    def runner(tasks, state_dir, workers=1, desc="tasks", show_progress=True):
        return run_slurm(tasks, state_dir, workers, desc=desc, show_progress=show_progress, options=opts)

    return runner
