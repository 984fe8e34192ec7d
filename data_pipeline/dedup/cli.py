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
    p.add_argument("--input", required=True, help="directory of *.jsonl.zst shards (searched recursively)")
    p.add_argument("--output", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--previous", default=None,
                   help="output dir of an earlier dedup run: dedup INPUT against its stored signatures "
                        "(incremental; earlier shards are rewritten too)")
    p.add_argument("--ngram", type=int, default=5, help="character n-gram length")
    p.add_argument("--bands", type=int, default=40, help="LSH bands")
    p.add_argument("--rows", type=int, default=20, help="MinHash values per band")
    p.add_argument("--seed", type=int, default=1, help="hash-function seed")
    p.add_argument("--keep", choices=("newest", "oldest"), default="newest",
                   help="which copy of a cluster to keep (by WARC date, then snapshot name)")
    p.add_argument("--memory-mb", type=int, default=1024, help="memory budget of one LSH band task")
    p.add_argument("--host-threshold", type=float, default=0.8,
                   help="drop hosts whose share of pages removed as duplicates is above this")
    p.add_argument("--host-min-pages", type=int, default=10, help="never drop hosts with fewer pages")
    p.add_argument("--host-count", choices=("other_host", "all"), default="other_host",
                   help="count removals whose kept copy is on another host (other_host) or every removal (all)")
    p.add_argument("--no-host-filter", action="store_true", help="skip host filtering")
    p.add_argument("--save-minhash", action="store_true",
                   help="also store the full MinHash signatures (4*bands*rows bytes per document)")
    p.add_argument("--no-plot", action="store_true", help="skip cluster_sizes.png (no matplotlib import)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    from launch.slurm_array import add_slurm_executor_arguments

    add_slurm_executor_arguments(p)  # --executor local|slurm and the --slurm-* options
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pydantic import ValidationError

    from data_pipeline.dedup.pipeline import DedupConfig, run_dedup
    from hibari.errors import HibariError

    try:
        config = DedupConfig(ngram=args.ngram, bands=args.bands, rows=args.rows, seed=args.seed, keep=args.keep,
                             memory_mb=args.memory_mb, host_threshold=args.host_threshold,
                             host_min_pages=args.host_min_pages, host_count=args.host_count,
                             host_filter=not args.no_host_filter, save_minhash=args.save_minhash,
                             plot=not args.no_plot)
    except ValidationError as err:
        e = err.errors()[0]
        raise HibariError(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e['input']!r})") from None
    if args.workers < 1:
        raise HibariError(f"--workers: expected >= 1 (got {args.workers})")
    from launch.slurm_array import make_runner

    report = run_dedup(args.input, args.output, config, previous=args.previous, workers=args.workers,
                       runner=make_runner(args), show_progress=not args.quiet)
    print(f"dedup: {report['docs_in']:,} docs in, {report['dup_removed']:,} near-duplicates removed, "
          f"{report['host_removed']:,} removed by host filter ({report['hosts_dropped']} hosts), "
          f"{report['docs_out']:,} out; report: {args.output}/_dedup/report.md")
    return 0
