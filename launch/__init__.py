"""hibari launch: the `hibari` CLI, config loading, local and SLURM launchers."""
