"""`hibari launch`: start a training job. `local` is here; `slurm` is added by `launch/slurm.py` when present
(that module exposes `register_slurm(subparsers)`, called with this group's subparsers)."""

from __future__ import annotations

import argparse
import importlib


def register(subparsers) -> None:
    p = subparsers.add_parser("launch", help="start a training job (local processes or SLURM)",
                              description="Start `hibari train` as a multi-process job.")
    sub = p.add_subparsers(dest="launch_command", metavar="TARGET")
    sub.required = True

    local = sub.add_parser(
        "local", help="N processes on this machine (torch elastic); a failed rank stops the job",
        description="Validate CONFIG for N processes, then run `hibari train CONFIG` as ranks 0..N-1 under the "
                    "torch elastic agent. When a rank fails, the others are stopped and the exit status is "
                    "non-zero with one line naming the failed rank; rerunning resumes from the latest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  hibari launch local --nproc 4 configs/tiny.yaml run.dir=runs/t4 parallel.tp=2")
    local.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    local.add_argument("config", help="training config YAML")
    local.add_argument("overrides", nargs="*", metavar="a.b=v", help="config overrides")
    local.set_defaults(func=_local)

    try:
        slurm = importlib.import_module("launch.slurm")
    except ModuleNotFoundError as err:
        if err.name not in ("launch.slurm",):
            raise
        slurm = None
    if slurm is not None and hasattr(slurm, "register_slurm"):
        slurm.register_slurm(sub)


def _local(args) -> int:
    from hibari.config import load_config
    from launch.local import launch_local
    from megatron_ext.train.config import TrainConfig
    from megatron_ext.train.loop import plan

    if args.nproc < 1:
        from hibari.errors import HibariError

        raise HibariError(f"--nproc {args.nproc}: expected a positive number of processes")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    plan(cfg, args.nproc)  # a bad config or layout fails here, before any process starts
    launch_local(args.nproc, args.config, args.overrides)
    return 0
