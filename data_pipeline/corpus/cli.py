"""`hibari corpus ...` commands: the group and clean / annotate (other stages join it from launch/cli.py's COMMANDS)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("corpus", help="build a cleaned Japanese corpus from Common Crawl WARC files")
    sub = parser.add_subparsers(dest="corpus_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    _register_own_commands(sub)  # the other `corpus` sub-commands are listed in launch/cli.py's COMMANDS


def _register_own_commands(sub) -> None:
    """clean / annotate: added by the cleaning pipeline."""
    clean = sub.add_parser("clean", help="WARC files -> cleaned Japanese JSONL.zst shards + funnel report")
    clean.add_argument("--input", required=True, nargs="+", action="extend",
                       help="WARC / WARC.gz files or globs (quote them); several, repeatable")
    clean.add_argument("--output", required=True, help="output directory (one <stem>.jsonl.zst per input)")
    clean.add_argument("--workers", type=int, default=1, help="parallel tasks (default 1)")
    clean.add_argument("--config", default=None, help="YAML config (see data_pipeline/corpus/config.py)")
    clean.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, e.g. extract.extractor=resiliparse (repeatable)")
    clean.add_argument("--snapshot", default=None,
                       help="alias of --set snapshot=NAME (default: warcinfo isPartOf / file name / unknown)")
    clean.add_argument("--keep-dropped-text", action="store_true",
                       help="also store the extracted text of dropped pages in the drop ledger (OUTPUT/_ledger/)")
    clean.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier run with other inputs/config in --output")
    clean.add_argument("--quiet", action="store_true", help="no progress display")
    from data_pipeline.executor.options import add_executor_arguments

    add_executor_arguments(clean)  # --executor local|slurm and the --slurm-* options
    clean.set_defaults(func=_clean)

    from data_pipeline.corpus.ledger import register_explain

    register_explain(sub)  # hibari corpus explain OUTPUT --id ID | --url URL

    annotate = sub.add_parser("annotate", help="add Swallow quality/NG-word features and keep/reasons to JSONL")
    from data_pipeline.readers import add_input_arguments

    add_input_arguments(annotate)  # --input (JSONL/txt/parquet/arrow/saved datasets), --text-key/-format, --split
    annotate.add_argument("--output", required=True, help="output JSONL (.zst to compress); OUTPUT.run.json records "
                          "its inputs, config and counts")
    annotate.add_argument("--config", default=None, help="YAML config (AnnotateConfig: quality, ngword, classifier "
                                                         "sections, as in corpus clean)")
    annotate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="config override, e.g. ngword.max_fraction=0.1 (repeatable)")
    annotate.add_argument("--overwrite", action="store_true",
                          help="replace an OUTPUT made from other inputs, config or models")
    # short forms of config keys (each is --set KEY=VALUE, and wins over it); no defaults here: AnnotateConfig has them
    short = annotate.add_argument_group("config shortcuts (defaults from AnnotateConfig)")
    short.add_argument("--rules", default=None,
                       help="rule groups deciding 'keep', a subset of quality,ngword: quality.enabled / "
                            "ngword.enabled (true)")
    short.add_argument("--ng-words", nargs="+", default=None, metavar="PATH",
                       help="ngword.paths: NG word list files/dirs (null: the shipped Swallow lists)")
    short.add_argument("--no-ngword", action="store_true", help="ngword.enabled=false: no NG-word features or rule")
    short.add_argument("--classifier", default=None, metavar="MODEL_DIR",
                       help="classifier.model: also store quality_score from this `corpus classifier` model; below "
                            "the threshold is keep: false (null)")
    short.add_argument("--classifier-threshold", type=float, default=None, metavar="T",
                       help="classifier.threshold: keep iff quality_score >= T (0.5)")
    annotate.add_argument("--quiet", action="store_true")
    annotate.set_defaults(func=_annotate)


def _clean(args) -> int:
    from data_pipeline.corpus.config import CleanConfig, load_stage_config
    from data_pipeline.corpus.pipeline import run_clean

    from data_pipeline.executor.options import make_runner

    cfg = load_stage_config(CleanConfig, args.config, args.overrides,
                            {"snapshot": ("--snapshot", args.snapshot)} if args.snapshot else {})
    report = run_clean(args.input, args.output, cfg, workers=args.workers, show_progress=not args.quiet,
                       runner=make_runner(args), overwrite=args.overwrite, keep_dropped_text=args.keep_dropped_text)
    print(f"corpus clean: {report['records_read']:,} records read, {report['documents_written']:,} documents kept "
          f"in {report['shards']} shard(s), {report['documents_dropped']:,} dropped -> {args.output} (report.md, "
          f"funnel.png, drop ledger in _ledger/; {report['pages_per_s_per_task']} pages/s per task)")
    return 0


def _annotate(args) -> int:
    from data_pipeline.corpus.annotate import annotate_file

    counts = annotate_file(args.input, args.output, annotate_config(args), show_progress=not args.quiet,
                           text_key=args.text_key, split=args.split, text_format=args.text_format,
                           overwrite=args.overwrite)
    done = " (already done: same inputs and config)" if counts.get("already_done") else ""
    print(f"corpus annotate: {counts['records']:,} records, {counts['kept']:,} keep, {counts['dropped']:,} drop"
          f"{', ' + str(counts['no_text_field']) + ' without text' if counts['no_text_field'] else ''} -> "
          f"{args.output}{done}")
    return 0


def annotate_config(args):
    """AnnotateConfig from --config, --set and the shortcut flags (a shortcut wins over --set and the file)."""
    from data_pipeline.corpus.annotate import parse_rules
    from data_pipeline.corpus.config import AnnotateConfig, load_stage_config
    from hibari.errors import HibariError

    shortcuts = {}
    rules = parse_rules(args.rules)
    if rules is not None:
        if "ngword" in rules and args.no_ngword:
            raise HibariError("--rules ngword needs the NG-word features (drop --no-ngword)")
        shortcuts["quality.enabled"] = ("--rules", "quality" in rules)
        shortcuts["ngword.enabled"] = ("--rules", "ngword" in rules)
    if args.no_ngword:
        shortcuts["ngword.enabled"] = ("--no-ngword", False)
    if args.ng_words is not None:
        shortcuts["ngword.paths"] = ("--ng-words", args.ng_words)
    if args.classifier is not None:
        shortcuts["classifier.model"] = ("--classifier", args.classifier)
    if args.classifier_threshold is not None:
        shortcuts["classifier.threshold"] = ("--classifier-threshold", args.classifier_threshold)
    return load_stage_config(AnnotateConfig, args.config, args.overrides, shortcuts)
