"""`hibari tokenizer train|expand` (heavy imports stay inside the handlers)."""

from __future__ import annotations

import argparse
import os


def _train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer.spm import train_tokenizer

    meta = train_tokenizer(args.input, args.vocab_size, args.out, model_type=args.model_type,
                           normalization=args.normalization, max_sentences=args.max_sentences,
                           threads=args.threads, text_key=args.text_key,
                           character_coverage=args.character_coverage)
    print(f"wrote {args.out}/tokenizer.model (+ HF files): {args.vocab_size} pieces, {args.model_type}, trained on "
          f"{meta['lines']:,} lines of {meta['documents']:,} documents (skipped: {meta['skipped_empty']} empty docs, "
          f"{meta['skipped_long_lines']} over-long lines, {meta['skipped_undecodable_lines']} undecodable lines)")
    return 0


def _expand(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer.spm import expand_tokenizer

    s = expand_tokenizer(args.base, args.add, args.out, pad_to_multiple=args.pad_to_multiple, sample=args.sample,
                         text_key=args.text_key)
    print(f"wrote {args.out}: {s['base_vocab_size']:,} base + {s['added_pieces']:,} new pieces = "
          f"{s['vocab_size']:,} (model embeddings padded to {s['padded_vocab_size']:,}); "
          f"{s['skipped_present']:,} pieces were already present")
    print(f"characters per token on {s['sample_texts']} sample texts: {s['chars_per_token_before']:.3f} before, "
          f"{s['chars_per_token_after']:.3f} after")
    return 0


def register(subparsers) -> None:
    grp = subparsers.add_parser("tokenizer", help="train SentencePiece tokenizers and expand Llama/Mistral vocabularies")
    sub = grp.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    grp.set_defaults(func=lambda a: (grp.print_help(), 2)[1])

    p = sub.add_parser("train", help="train a Llama-style SentencePiece model on corpus shards",
                       description="Train a SentencePiece model (byte fallback, split digits, identity normalizer) "
                                   "on the text of JSONL[.zst] shards (or .txt files) and write tokenizer.model "
                                   "plus Hugging Face tokenizer files to --out.")
    p.add_argument("--input", required=True, nargs="+", help="JSONL[.zst] shards or .txt files (paths/globs)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--normalization", choices=["identity", "nfkc"], default="identity",
                   help="normalize the TRAINING TEXT with NFKC (Swallow); the model's own normalizer stays identity")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many lines")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_train)

    p = sub.add_parser("expand", help="merge new pieces into a Llama/Mistral SentencePiece vocabulary (Swallow)",
                       description="Append the pieces of --add that --base lacks (every base id unchanged), write "
                                   "tokenizer.model and HF tokenizer files to --out, and report characters per "
                                   "token on a Japanese sample before/after.")
    p.add_argument("--base", required=True, help="base tokenizer dir (with tokenizer.model) or .model file")
    p.add_argument("--add", required=True, help="SentencePiece model (or dir) with the pieces to add")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--pad-to-multiple", type=int, default=8,
                   help="model embedding rows are padded to a multiple of this (recorded for expand-vocab)")
    p.add_argument("--sample", nargs="+", help="Japanese JSONL[.zst]/.txt for the chars-per-token report "
                                                "(default: a few built-in sentences)")
    p.add_argument("--text-key", default="text")
    p.set_defaults(func=_expand)
