"""`hibari corpus status DIR`: what a (SLURM or local) corpus stage has done, what failed and what is pending.

Registered into `hibari corpus` by `data_pipeline/corpus/cli.py` through `register_corpus_commands(subparsers)`.
"""

from __future__ import annotations


def register_corpus_commands(sub) -> None:
    p = sub.add_parser("status", help="summarise done / failed / pending shards of a corpus state directory",
                       description="Counts completion markers in a corpus state directory (the executor's "
                                   "STATE_DIR: done/<task>.json, failed/<task>.json) per stage, and the SLURM "
                                   "array jobs of those stages still in the queue.")
    p.add_argument("state_dir", metavar="DIR", help="the state directory of a corpus command")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(args) -> int:
    import json

    from launch.slurm_array import format_status, status_summary

    summary = status_summary(args.state_dir)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_status(summary, args.state_dir))
    return 0
