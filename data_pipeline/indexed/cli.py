"""`hibari data tokenize`: corpus shards -> Megatron .bin/.idx (heavy imports stay inside the handler)."""

from __future__ import annotations

import argparse
import json
import os


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.indexed.tokenize import tokenize_corpus

    summary = tokenize_corpus(args.input, args.tokenizer, args.output, workers=args.workers,
                              text_key=args.text_key, append_eod=args.append_eod, add_bos=not args.no_bos,
                              keep_parts=args.keep_parts)
    if summary.get("already_done"):
        print(f"{args.output}.bin/.idx already complete (remove {args.output}.json to redo)")
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
    p = sub.add_parser("tokenize", help="tokenize JSONL[.zst] shards into PREFIX.bin / PREFIX.idx",
                       description="Tokenize corpus shards into one Megatron indexed dataset (MMIDIDX). Parallel "
                                   "over shards, merged in input order (identical output for any --workers), "
                                   "resumable (rerun after a crash redoes only unfinished shards).")
    p.add_argument("--input", required=True, nargs="+", help="JSONL or JSONL.zst shard paths/globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir (tokenizer.model and/or HF tokenizer files)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel shard workers")
    p.add_argument("--append-eod", action="store_true", help="append EOS after every document")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to every document")
    p.add_argument("--text-key", default="text", help="JSON key holding the document text (default: text)")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-shard parts under PREFIX.parts/")
    p.add_argument("--json", action="store_true", help="also print the stats as one JSON line")
    p.set_defaults(func=_tokenize)
