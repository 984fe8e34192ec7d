"""`hibari corpus ...` commands. Sub-commands of other stages (dedup) register themselves through hooks below."""

from __future__ import annotations

import importlib

# modules that add sub-commands to `hibari corpus` through `register_corpus_commands(subparsers)`
_EXTRA_COMMAND_MODULES = ("data_pipeline.dedup.cli", "launch.slurm_corpus_cli")


def register(subparsers) -> None:
    parser = subparsers.add_parser("corpus", help="build a cleaned Japanese corpus from Common Crawl WARC files")
    sub = parser.add_subparsers(dest="corpus_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    _register_own_commands(sub)
    for module_name in _EXTRA_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        module.register_corpus_commands(sub)


def _register_own_commands(sub) -> None:
    """clean / annotate: added by the cleaning pipeline."""
    clean = sub.add_parser("clean", help="WARC files -> cleaned Japanese JSONL.zst shards + funnel report")
    clean.add_argument("--input", required=True, help="WARC / WARC.gz file or glob (quote it)")
    clean.add_argument("--output", required=True, help="output directory (one <stem>.jsonl.zst per input)")
    clean.add_argument("--workers", type=int, default=1, help="parallel tasks (default 1)")
    clean.add_argument("--config", default=None, help="YAML config (see data_pipeline/corpus/config.py)")
    clean.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, e.g. extract.extractor=resiliparse (repeatable)")
    clean.add_argument("--snapshot", default=None,
                       help="snapshot name for all inputs (default: warcinfo isPartOf / file name / unknown)")
    clean.add_argument("--quiet", action="store_true", help="no progress display")
    from launch.slurm_array import add_slurm_executor_arguments

    add_slurm_executor_arguments(clean)  # --executor local|slurm and the --slurm-* options
    clean.set_defaults(func=_clean)

    annotate = sub.add_parser("annotate", help="add Swallow quality/NG-word features and keep/reasons to JSONL")
    annotate.add_argument("--input", required=True, help="JSONL or JSONL.zst with a 'text' field per record")
    annotate.add_argument("--output", required=True, help="output JSONL (.zst to compress)")
    annotate.add_argument("--rules", default=None,
                          help="rule groups deciding 'keep': quality,ngword (default: all that apply)")
    annotate.add_argument("--ng-words", nargs="+", default=None, metavar="PATH",
                          help="NG word list files/dirs (default: the shipped Swallow lists)")
    annotate.add_argument("--no-ngword", action="store_true", help="do not compute NG-word features")
    annotate.add_argument("--quiet", action="store_true")
    annotate.set_defaults(func=_annotate)


def _clean(args) -> int:
    from data_pipeline.corpus.config import CleanConfig
    from data_pipeline.corpus.pipeline import run_clean
    from hibari.config import load_config

    overrides = list(args.overrides)
    cfg = load_config(CleanConfig, args.config, overrides)
    if args.snapshot:
        cfg.snapshot = args.snapshot
    from launch.slurm_array import make_runner

    runner = make_runner(args)
    report = run_clean(args.input, args.output, cfg, workers=args.workers, executor=args.executor,
                       show_progress=not args.quiet, runner=runner)
    print(f"corpus clean: {report['documents_written']:,} documents in {report['shards']} shard(s) -> "
          f"{args.output} (report.md, funnel.png; {report['pages_per_s_per_task']} pages/s per task)")
    return 0


def _annotate(args) -> int:
    from data_pipeline.corpus.annotate import annotate_file, parse_rules

    counts = annotate_file(args.input, args.output, parse_rules(args.rules), ng_paths=args.ng_words,
                           use_ng=not args.no_ngword, show_progress=not args.quiet)
    print(f"corpus annotate: {counts['records']:,} records, {counts['kept']:,} keep, {counts['dropped']:,} drop"
          f"{', ' + str(counts['no_text_field']) + ' without text' if counts['no_text_field'] else ''} -> "
          f"{args.output}")
    return 0
