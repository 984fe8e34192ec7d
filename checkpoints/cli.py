"""`hibari convert ...`: hf-to-hibari, hibari-to-hf, expand-vocab."""

from __future__ import annotations

import importlib


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and hibari formats")
    sub = parser.add_subparsers(dest="convert_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("hf-to-hibari", help="HF Llama/Mistral directory -> hibari DCP checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_hf_to_hibari)

    p = sub.add_parser("hibari-to-hf", help="hibari checkpoint -> HF directory (safetensors)")
    p.add_argument("--ckpt", required=True, help="hibari checkpoint directory (converted or a training step)")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--tokenizer", help="directory with tokenizer files to copy next to the model")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_hibari_to_hf)

    try:  # added by the vocabulary-expansion module
        module = importlib.import_module("checkpoints.expand_vocab")
    except ModuleNotFoundError as err:
        if err.name != "checkpoints.expand_vocab":
            raise
    else:
        module.register_expand_vocab(sub)


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
