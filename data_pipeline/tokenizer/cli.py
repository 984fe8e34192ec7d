"""`hibari tokenizer train|expand` (heavy imports stay inside the handlers)."""

from __future__ import annotations

import argparse
import os

from hibari.errors import HibariError


def _refuse_existing_out(args: argparse.Namespace) -> None:
    """A non-empty --out holds a tokenizer (or something else): replaced only with --overwrite."""
    from pathlib import Path

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise HibariError(f"--out {out}: not empty (it would be replaced); use --overwrite or another --out")


def _train(args: argparse.Namespace) -> int:
    _refuse_existing_out(args)
    from data_pipeline.tokenizer.spm import train_tokenizer

    meta = train_tokenizer(args.input, args.vocab_size, args.out, model_type=args.model_type,
                           normalization=args.normalization, max_sentences=args.max_sentences,
                           threads=args.threads, text_key=args.text_key,
                           character_coverage=args.character_coverage, split=args.split,
                           text_format=args.text_format)
    print(f"wrote {args.out}/tokenizer.model (+ HF files): {args.vocab_size} pieces, {args.model_type}, trained on "
          f"{meta['lines']:,} lines of {meta['documents']:,} documents (skipped: {meta['skipped_empty']} empty docs, "
          f"{meta['skipped_long_lines']} over-long lines, {meta['skipped_undecodable_lines']} undecodable lines)")
    return 0


def _expand(args: argparse.Namespace) -> int:
    _refuse_existing_out(args)
    from data_pipeline.tokenizer.bpe_expand import tokenizer_kind

    if tokenizer_kind(args.base) == "bpe":
        return _expand_bpe(args)
    if args.add is None or args.corpus or args.add_tokens is not None:
        raise HibariError(f"--base {args.base} is a SentencePiece tokenizer: give --add MODEL (the pieces to merge "
                          f"in); --corpus/--add-tokens are for byte-level BPE (tokenizer.json) bases")
    from data_pipeline.tokenizer.spm import expand_tokenizer

    s = expand_tokenizer(args.base, args.add, args.out, pad_to_multiple=args.pad_to_multiple, sample=args.sample,
                         text_key=args.text_key, split=args.split, text_format=args.text_format)
    print(f"wrote {args.out}: {s['base_vocab_size']:,} base + {s['added_pieces']:,} new pieces = "
          f"{s['vocab_size']:,} (model embeddings padded to {s['padded_vocab_size']:,}); "
          f"{s['skipped_present']:,} pieces were already present")
    print(f"characters per token on {s['sample_texts']} sample texts: {s['chars_per_token_before']:.3f} before, "
          f"{s['chars_per_token_after']:.3f} after")
    return 0


def _expand_bpe(args: argparse.Namespace) -> int:
    if args.add is not None or not args.corpus or args.add_tokens is None:
        raise HibariError(f"--base {args.base} is a byte-level BPE tokenizer (tokenizer.json): give --corpus FILES "
                          f"and --add-tokens N (new merges are learned on the corpus); --add is for SentencePiece")
    from data_pipeline.tokenizer.bpe_expand import expand_bpe_tokenizer

    s = expand_bpe_tokenizer(args.base, args.corpus, args.add_tokens, args.out, pad_to_multiple=args.pad_to_multiple,
                             min_frequency=args.min_frequency, sample=args.sample, english_sample=args.english_sample,
                             text_key=args.text_key, split=args.split, text_format=args.text_format)
    early = (f" (only {s['added_tokens']:,} of {s['requested_tokens']:,}: no other non-ASCII pair occurs "
             f"{s['min_frequency']} times)" if s["stopped_early"] else "")
    print(f"wrote {args.out}: {s['base_vocab_size']:,} base ids + {s['added_tokens']:,} new tokens{early} = "
          f"{s['vocab_size']:,} (model embeddings padded to {s['padded_vocab_size']:,}); {s['merges_learned']:,} "
          f"merges learned on {s['pretokens']:,} pre-tokens ({s['non_ascii_pretoken_types']:,} distinct with "
          f"non-ASCII bytes) of {s['documents']:,} documents in {s['seconds']:.1f} s")
    print(f"characters per token on {s['sample_texts']} Japanese sample texts: {s['chars_per_token_before']:.3f} "
          f"before, {s['chars_per_token_after']:.3f} after; decode(encode(x)) == x on {s['sample_round_trips']}/"
          f"{s['sample_texts']}")
    print(f"English sample: {s['english_unchanged']}/{s['english_texts']} texts encode to exactly the base ids")
    return 0


def register(subparsers) -> None:
    grp = subparsers.add_parser("tokenizer", help="train SentencePiece tokenizers and expand Llama/Mistral vocabularies")
    sub = grp.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    grp.set_defaults(func=lambda a: (grp.print_help(), 2)[1])

    p = sub.add_parser("train", help="train a Llama-style SentencePiece model on corpus shards",
                       description="Train a SentencePiece model (byte fallback, split digits, identity normalizer) "
                                   "on the text of JSONL[.zst] shards, .txt files, parquet/arrow files or saved datasets and write tokenizer.model "
                                   "plus Hugging Face tokenizer files to --out.")
    from data_pipeline.readers import add_input_arguments

    add_input_arguments(p, text_key=False)  # --input (JSONL/txt/parquet/arrow/saved datasets), --text-format, --split
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--normalization", choices=["identity", "nfkc"], default="identity",
                   help="normalize the TRAINING TEXT with NFKC (Swallow); the model's own normalizer stays identity")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many lines")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_train)

    p = sub.add_parser("expand", help="expand a Llama/Mistral/Qwen vocabulary (SentencePiece or byte-level BPE)",
                       description="SentencePiece base (dir with tokenizer.model): append the pieces of --add that "
                                   "--base lacks. Byte-level BPE base (dir with tokenizer.json: Llama 3, Qwen, "
                                   "Mistral-Nemo): learn --add-tokens new merges on --corpus on top of the base "
                                   "segmentation (pure-ASCII text keeps its exact ids). Every base id is unchanged; "
                                   "reports characters per token on a Japanese sample before/after.")
    p.add_argument("--base", required=True, help="base tokenizer dir (tokenizer.model or tokenizer.json) or file")
    p.add_argument("--add", help="SentencePiece bases: model (or dir) with the pieces to add")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="byte-level BPE bases: Japanese documents to learn new merges on (same formats as --input)")
    p.add_argument("--add-tokens", type=int, help="byte-level BPE bases: number of new tokens to learn")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="byte-level BPE bases: stop when no pair occurs this many times (default 2)")
    p.add_argument("--english-sample", nargs="+", action="extend", metavar="PATH",
                   help="byte-level BPE bases: English documents checked to encode unchanged (default: built-in)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    p.add_argument("--pad-to-multiple", type=int, default=8,
                   help="model embedding rows are padded to a multiple of this (recorded for expand-vocab)")
    p.add_argument("--sample", nargs="+", action="extend", help="Japanese documents for the chars-per-token report: "
                   "JSONL, .txt, parquet, arrow or saved datasets, like --input elsewhere (default: built-in sentences)")
    add_input_arguments(p, input=False, text_key=False)  # --text-format, --split of --sample (no --input here)
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_expand)
