"""`hibari convert ...`: hf-to-hibari, hibari-to-hf, expand-vocab.

Every subcommand writes its output all or nothing: a failure (bad input found midway, full disk, Ctrl-C) leaves no
partial directory, no `*.tmp` file and no half shard, and an --overwrite target stays as it was.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from hibari.errors import HibariError


def register(subparsers) -> None:
    from checkpoints.expand_vocab import register_expand_vocab

    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and hibari formats")
    sub = parser.add_subparsers(dest="convert_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("hf-to-hibari", help="HF Llama/Mistral directory -> hibari DCP checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_one_line_io_errors(_hf_to_hibari))

    p = sub.add_parser("hibari-to-hf", help="hibari checkpoint -> HF directory (safetensors)")
    p.add_argument("--ckpt", required=True, help="hibari checkpoint directory (converted or a training step)")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--tokenizer", help="directory with tokenizer files to copy next to the model")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_one_line_io_errors(_hibari_to_hf))

    register_expand_vocab(sub)
    expand = sub.choices["expand-vocab"]
    expand.set_defaults(func=_one_line_io_errors(_remove_output_on_failure(expand.get_default("func"))))


def _one_line_io_errors(func):
    """An OS error while converting (disk full, permission) is the user's to fix: one line naming the file."""
    @functools.wraps(func)
    def wrapper(args):
        try:
            return func(args)
        except OSError as err:
            where = err.filename or getattr(args, "out", "")
            raise HibariError(f"{where}: {err.strerror or err} (no output written)") from None
    return wrapper


def _remove_output_on_failure(func):
    """For commands that write into --out directly: remove what they wrote when they fail (the directory is new or
    was emptied by --overwrite, so nothing of the user's is lost)."""
    @functools.wraps(func)
    def wrapper(args):
        out = Path(args.out)
        existed_with_content = out.is_dir() and any(out.iterdir())
        try:
            return func(args)
        except BaseException:
            if out.is_dir() and (args.overwrite or not existed_with_content):
                shutil.rmtree(out, ignore_errors=True)
            raise
    return wrapper


def _hf_to_hibari(args) -> int:
    from checkpoints.convert import hf_to_hibari

    s = hf_to_hibari(args.hf, args.out, overwrite=args.overwrite)
    print(f"converted {args.hf} -> {args.out}: {s['tensors']} tensors, {s['params'] / 1e6:.2f}M parameters, "
          f"{s['bytes'] / 1e6:.1f} MB")
    return 0


def _hibari_to_hf(args) -> int:
    from checkpoints.convert import hibari_to_hf

    s = hibari_to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    tok = f", tokenizer files: {', '.join(s['tokenizer_files'])}" if s["tokenizer_files"] else ""
    print(f"exported {args.ckpt} -> {args.out}: {s['tensors']} tensors in {len(s['files'])} file(s), "
          f"{s['bytes'] / 1e6:.1f} MB{tok}")
    return 0
