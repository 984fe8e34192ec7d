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
