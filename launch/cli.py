"""The `hibari` command line.

Each command group lives in the package that owns it and exposes `register(subparsers)`; this file only knows
where they are. A group whose module is not present is simply not listed, so `hibari --help` shows only commands
that work. Group modules must import heavy libraries (torch, transformers, ...) inside their command functions so
that `hibari --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hibari.errors import HibariError

# group name -> module providing `register(subparsers)`
COMMAND_GROUPS: dict[str, str] = {
    "convert": "checkpoints.cli",
    "train": "megatron_ext.train.cli",
    "launch": "launch.launch_cli",
    "corpus": "data_pipeline.corpus.cli",
    "tokenizer": "data_pipeline.tokenizer.cli",
    "data": "data_pipeline.indexed.cli",
    "demo": "launch.demo",
}


def _load_group(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            return None  # the group has not landed yet
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hibari",
        description="hibari: continual pretraining of Llama/Mistral models on Japanese web data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_GROUPS.values():
        module = _load_group(module_name)
        if module is not None:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        rc = func(args)
    except HibariError as err:
        print(f"hibari: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hibari: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected bug: keep the traceback available, but lead with one line
        if os.environ.get("HIBARI_TRACEBACK"):
            raise
        print(f"hibari: internal error: {type(err).__name__}: {err} (set HIBARI_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
