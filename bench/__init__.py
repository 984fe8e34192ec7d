"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.convert`. Each writes its section to
bench/results/<area>.md; `python -m bench.collect` assembles BENCHMARKS.md."""
