"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.convert` (bench/tokenize.py would
shadow the standard library module of the same name if bench/ were put first on sys.path by running a file)."""
