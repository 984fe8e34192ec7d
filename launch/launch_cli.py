"""`hibari launch local|slurm`: start `hibari train` as a multi-process job (this machine, or a SLURM batch job)."""

from __future__ import annotations

import argparse

from launch.slurm_submit import register_slurm


def register(subparsers) -> None:
    p = subparsers.add_parser("launch", help="start a training job (local processes or SLURM)",
                              description="Start `hibari train` as a multi-process job.")
    sub = p.add_subparsers(dest="launch_command", metavar="TARGET")
    sub.required = True

    local = sub.add_parser(
        "local", help="N processes on this machine; a failed rank stops the job",
        description="Check CONFIG for N processes, then run `hibari train CONFIG` as ranks 0..N-1. When a rank "
                    "fails, the others are stopped; its one-line error and one line from the launcher name it. "
                    "SIGUSR1 / SIGTERM: every rank saves a checkpoint at the end of its step and stops (exit 0). "
                    "Ctrl-C: the same, then `hibari: interrupted, saved step N`; a second Ctrl-C stops at once. No "
                    "rank outlives the launcher. Rerunning resumes from the latest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  hibari launch local --nproc 4 configs/tiny.yaml run.dir=runs/t4 parallel.tp=2\n"
               "  hibari launch local configs/tiny.yaml run.dir=runs/t4 --nproc 4 parallel.tp=2 --check")
    local.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    local.add_argument("config", help="training config YAML")
    local.add_argument("overrides", nargs="*", metavar="a.b=v", help="config overrides, anywhere on the command line")
    local.add_argument("--check", action="store_true",
                       help="run the pre-flight checks for N processes and exit; start nothing, write nothing")
    local.set_defaults(func=_local)

    register_slurm(sub)


def _local(args) -> int:
    from hibari.config import load_config
    from hibari.errors import HibariError
    from launch.local import launch_local
    from launch.preflight import check_run
    from megatron_ext.train.config import TrainConfig
    from parallel.dist import check_gpus_per_node

    if args.nproc < 1:
        raise HibariError(f"--nproc {args.nproc}: expected a positive number of processes")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    # a bad config, layout, data set or checkpoint fails here, before any process starts
    notes = check_run(cfg, args.nproc, scan_tokens=args.check)
    check_gpus_per_node(args.nproc)  # with CUDA the ranks use NCCL: one GPU each (no check without CUDA)
    if args.check:
        print(f"config ok: {notes[0]}")
        for note in notes[1:]:
            print(f"  {note}")
        return 0
    return launch_local(args.nproc, args.config, args.overrides, run_dir=cfg.run.dir)
