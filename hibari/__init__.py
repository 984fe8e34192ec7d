"""hibari's foundation: what every other package shares and nothing else.

errors (the one user-facing error type), config (typed-config base, YAML + `a.b=v` overrides), progress (bars with
rate and ETA), io (atomic writes, JSON/JSONL), env (torchrun/SLURM environment translation). This package imports
no other project package; everything else may import it.
"""

__version__ = "0.1.0"
