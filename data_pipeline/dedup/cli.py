"""`hibari corpus dedup`: registered into the `corpus` group by data_pipeline.corpus.cli."""

from __future__ import annotations

import argparse


def register_corpus_commands(sub) -> None:
    p = sub.add_parser(
        "dedup", help="remove near-duplicates (MinHash-LSH over character n-grams), then filter hosts",
        description="Near-duplicate removal over the shards of `hibari corpus clean` (Swallow: character 5-grams, "
                    "40 bands x 20 rows, keep the newest copy), resumable; writes deduplicated shards with the same "
                    "names, removal lists and a report under OUTPUT/_dedup/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from data_pipeline.readers import FORMATS_HELP, add_input_arguments

    add_input_arguments(p, text_key=False, text_format=False,  # records need 'id' and 'text' (others pass through)
                        help=f"directories of *.jsonl.zst shards (searched recursively), or {FORMATS_HELP}; several")
    p.add_argument("--output", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--previous", default=None,
                   help="output dir of an earlier dedup run: dedup INPUT against its stored signatures "
                        "(incremental; earlier shards are rewritten too)")
    p.add_argument("--config", default=None, help="YAML config (DedupConfig in data_pipeline/dedup/pipeline.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. bands=14 (repeatable)")
    # short forms of config keys (--set KEY=VALUE does the same); no defaults here: DedupConfig holds them
    a = p.add_argument_group("config shortcuts (each is --set KEY=VALUE; defaults from DedupConfig)")
    a.add_argument("--ngram", type=int, help="ngram: character n-gram length (5)")
    a.add_argument("--bands", type=int, help="bands: LSH bands (40)")
    a.add_argument("--rows", type=int, help="rows: MinHash values per band (20)")
    a.add_argument("--seed", type=int, help="seed: hash-function seed (1)")
    a.add_argument("--keep", choices=("newest", "oldest"),
                   help="keep: which copy of a cluster to keep, by WARC date then snapshot name (newest)")
    a.add_argument("--memory-mb", type=int, help="memory_mb: memory budget of one LSH band task (1024)")
    a.add_argument("--host-threshold", type=float,
                   help="host_threshold: drop hosts whose share of pages removed as duplicates is above this (0.8)")
    a.add_argument("--host-min-pages", type=int, help="host_min_pages: never drop hosts with fewer pages (10)")
    a.add_argument("--host-count", choices=("other_host", "all"),
                   help="host_count: count removals whose kept copy is on another host, or all (other_host)")
    a.add_argument("--no-host-filter", dest="host_filter", action="store_const", const=False,
                   help="host_filter=false: skip host filtering")
    a.add_argument("--save-minhash", dest="save_minhash", action="store_const", const=True,
                   help="save_minhash=true: also store the full MinHash signatures (4*bands*rows bytes per document)")
    a.add_argument("--no-plot", dest="plot", action="store_const", const=False,
                   help="plot=false: skip cluster_sizes.png (no matplotlib import)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run with other inputs or parameters in --output")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    from data_pipeline.executor.options import add_executor_arguments

    add_executor_arguments(p)  # --executor local|slurm and the --slurm-* options
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


_SHORTCUTS = {"ngram": "--ngram", "bands": "--bands", "rows": "--rows", "seed": "--seed", "keep": "--keep",
              "memory_mb": "--memory-mb", "host_threshold": "--host-threshold", "host_min_pages": "--host-min-pages",
              "host_count": "--host-count", "host_filter": "--no-host-filter", "save_minhash": "--save-minhash",
              "plot": "--no-plot"}


def config_from_args(args):
    """DedupConfig from --config, --set and the shortcut flags (a shortcut wins over --set and the file)."""
    from data_pipeline.corpus.config import load_stage_config
    from data_pipeline.dedup.pipeline import DedupConfig

    used = {key: (flag, getattr(args, key)) for key, flag in _SHORTCUTS.items() if getattr(args, key, None) is not None}
    return load_stage_config(DedupConfig, args.config, args.overrides, used)


def _run(args) -> int:
    from data_pipeline.dedup.pipeline import run_dedup
    from data_pipeline.executor.options import make_runner
    from hibari.errors import HibariError

    config = config_from_args(args)
    if args.workers < 1:
        raise HibariError(f"--workers: expected >= 1 (got {args.workers})")
    report = run_dedup(args.input, args.output, config, previous=args.previous, workers=args.workers,
                       runner=make_runner(args), show_progress=not args.quiet, split=args.split,
                       overwrite=args.overwrite)
    print(f"dedup: {report['docs_in']:,} docs in, {report['dup_removed']:,} near-duplicates removed, "
          f"{report['host_removed']:,} removed by host filter ({report['hosts_dropped']} hosts), "
          f"{report['docs_out']:,} out; report: {args.output}/_dedup/report.md")
    return 0
