"""The `hibari` command line: one explicit registry of every command group, and the error/exit-code rules.

`COMMANDS` lists, in `hibari --help` order, where each command lives: `(group, "module:function")`. The first
entry of a group gets the top-level sub-parsers and adds the group (`hibari corpus`); each later entry of the same
group gets the group's sub-parsers and adds its command(s) to it (`hibari corpus dedup`). Adding a command is one
line here. Every listed module ships with hibari, so a missing one is an import error, not a hidden command.
Group modules import heavy libraries (torch, transformers, ...) inside their command functions so that
`hibari --help` stays fast.

Overrides (`a.b=value`) of the commands that take them (`train`, `launch local|slurm`) may appear anywhere on the
command line, before or after options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from hibari.errors import HibariError

COMMANDS: tuple[tuple[str, str], ...] = (
    # group      module:function                                         commands
    ("convert", "checkpoints.cli:register"),                              # hf-to-hibari | hibari-to-hf | expand-vocab
    ("train", "megatron_ext.train.cli:register"),                         # train
    ("launch", "launch.launch_cli:register"),                             # launch local | slurm
    ("corpus", "data_pipeline.corpus.cli:register"),                      # corpus clean | annotate
    ("corpus", "data_pipeline.dedup.cli:register_corpus_commands"),       # corpus dedup
    ("corpus", "data_pipeline.corpus.export:register_corpus_commands"),   # corpus export
    ("corpus", "data_pipeline.executor.status:register_corpus_commands"), # corpus status
    ("corpus", "data_pipeline.classifier.cli:register"),                  # corpus classifier train | eval | ...
    ("tokenizer", "data_pipeline.tokenizer.cli:register"),                # tokenizer train | expand
    ("data", "data_pipeline.indexed.cli:register"),                       # data tokenize
    ("eval", "launch.eval_cli:register"),                                 # eval
    ("demo", "launch.demo:register"),                                     # demo
)

# error file of a rank started by `hibari launch local` or the SLURM rank supervisor: the rank's one-line error goes
# there instead of stderr, and the launcher reports the error of the rank that failed first, once
RANK_ERROR_FILE_ENV = "HIBARI_RANK_ERROR_FILE"
_RANK_ERROR_FILE: str | None = None


def _subparsers_of(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise HibariError(f"command group {parser.prog!r} has no sub-commands to join")


def _resolve(target: str):
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or, when `argv` names a command group, only that group: a rank of a training job
    (`hibari train ...`) imports no corpus or tokenizer code."""
    parser = argparse.ArgumentParser(
        prog="hibari",
        description="hibari: continual pretraining of Llama/Mistral models on Japanese web data.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {group for group, _ in COMMANDS}
    wanted = argv[0] if argv and argv[0] in groups else None
    for group, target in COMMANDS:
        if wanted is not None and group != wanted:
            continue
        # the first entry of a group creates it at the top level; the others add their commands to it
        sub = _subparsers_of(top.choices[group]) if group in top.choices else top
        _resolve(target)(sub)
        if group not in top.choices:
            raise HibariError(f"{target} did not add the command group {group!r} listed in launch/cli.py")
    return parser


def _takes_positional_overrides(parser: argparse.ArgumentParser, func) -> bool:
    """True when the leaf command that owns `func` has a positional `overrides` argument (a.b=v ...)."""
    stack = [parser]
    while stack:
        p = stack.pop()
        if p._defaults.get("func") is func:
            return any(a.dest == "overrides" and not a.option_strings for a in p._actions)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return False


_OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")


def _looks_like_override(token: str) -> bool:
    return _OVERRIDE.match(token) is not None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """argparse, plus: `a.b=v` overrides are accepted anywhere (argparse alone rejects them after an option), and an
    override written before the config file still leaves the file as the config."""
    args, extras = parser.parse_known_args(argv)
    func = getattr(args, "func", None)
    positional = func is not None and _takes_positional_overrides(parser, func)
    if extras:
        wrong = extras if not positional else [t for t in extras if not _looks_like_override(t)]
        if wrong:
            parser.error(f"unrecognized arguments: {' '.join(wrong)}")
        args.overrides = list(args.overrides or []) + extras
    config = getattr(args, "config", None)
    if positional and isinstance(config, str) and _looks_like_override(config) and not os.path.exists(config):
        files = [t for t in args.overrides if not _looks_like_override(t)]
        if len(files) == 1:  # `hibari train a.b=1 cfg.yaml`: the config is the one token that is not an override
            args.overrides = [config] + [t for t in args.overrides if t is not files[0]]
            args.config = files[0]
    return args


def _take_rank_error_file() -> None:
    """Read once and removed from the environment: processes this rank starts are not ranks of the launcher."""
    global _RANK_ERROR_FILE
    _RANK_ERROR_FILE = os.environ.pop(RANK_ERROR_FILE_ENV, None)


def _report_rank_error(line: str) -> None:
    """A rank of `hibari launch local` or of a SLURM job hands its one-line error to its supervisor (reported once)."""
    path = _RANK_ERROR_FILE
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _take_rank_error_file()
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parse_args(parser, argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        rc = func(args)
    except HibariError as err:
        _report_rank_error(f"hibari: error: {err}")
        return 2
    except KeyboardInterrupt:
        _report_rank_error("hibari: interrupted")
        return 130
    except Exception as err:  # an unexpected bug: keep the traceback available, but lead with one line
        if os.environ.get("HIBARI_TRACEBACK"):
            raise
        _report_rank_error(f"hibari: internal error: {type(err).__name__}: {err} (set HIBARI_TRACEBACK=1 for the "
                           "traceback)")
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
