"""The top layer: the `hibari` CLI (command registry), the local and SLURM training launchers, the demo. Nothing
imports `launch`."""
