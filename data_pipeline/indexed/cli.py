"""`hibari data tokenize`: corpus shards -> Megatron .bin/.idx (heavy imports stay inside the handler)."""

from __future__ import annotations

import argparse
import json
import os


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.executor.options import make_runner
    from data_pipeline.indexed.tokenize import tokenize_corpus

    summary = tokenize_corpus(args.input, args.tokenizer, args.output, workers=args.workers,
                              runner=make_runner(args), overwrite=args.overwrite,
                              text_key=args.text_key, append_eod=args.append_eod, add_bos=not args.no_bos,
                              keep_parts=args.keep_parts, split=args.split, text_format=args.text_format)
    if summary.get("already_done"):
        print(f"{args.output}.bin/.idx already complete from the same inputs, tokenizer and options "
              "(--overwrite redoes it)")
    skipped = summary["skipped_missing_text"] + summary["skipped_empty"] + summary["skipped_undecodable"]
    print(f"wrote {args.output}.bin/.idx: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
          f"({summary['dtype']}), skipped {skipped:,} (missing text {summary['skipped_missing_text']}, "
          f"empty {summary['skipped_empty']}, undecodable {summary['skipped_undecodable']})")
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="training data: tokenize corpora into Megatron .bin/.idx")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])
    p = sub.add_parser("tokenize", help="tokenize documents (JSONL, .txt, parquet, arrow, saved datasets) into PREFIX.bin / PREFIX.idx",
                       description="Tokenize corpus shards into one Megatron indexed dataset (MMIDIDX). Parallel "
                                   "over shards, merged in input order (identical output for any --workers), "
                                   "resumable (rerun after a crash redoes only unfinished shards).")
    from data_pipeline.readers import add_input_arguments

    add_input_arguments(p, text_key=False)  # --input (JSONL/txt/parquet/arrow/saved datasets), --text-format, --split
    p.add_argument("--tokenizer", required=True, help="tokenizer dir (tokenizer.model and/or HF tokenizer files)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel shard workers")
    p.add_argument("--append-eod", action="store_true", help="append EOS after every document")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to every document")
    p.add_argument("--text-key", default="text", help="JSON key / parquet or arrow column of the text (default: text)")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-shard parts under PREFIX.parts/")
    p.add_argument("--json", action="store_true", help="also print the stats as one JSON line")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output made from other inputs, tokenizer or options")
    from data_pipeline.executor.options import add_executor_arguments

    add_executor_arguments(p)  # --executor local|slurm (one task per shard) and the --slurm-* options
    p.set_defaults(func=_tokenize)
