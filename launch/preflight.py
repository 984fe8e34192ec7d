"""Pre-flight for the launchers: `hibari launch local --check`, `hibari launch slurm --dry-run`, and every real launch
run the training pre-flight (`megatron_ext.train.preflight`) for the job's world size before any process, process
group or file exists. Each failure is one HibariError line."""

from __future__ import annotations


def check_run(cfg, world_size: int, *, scan_tokens: bool = False) -> list[str]:
    """All pre-start checks for `world_size` ranks. Returns one-line notes, the layout summary first
    (`world 8 = dp 4 (replicate 1 x shard 4) x tp 2 x pp 1; grad accumulation 2`). scan_tokens: allow reading small
    .bin files whole for their largest token id (the explicit `--check` / `--dry-run` forms)."""
    from megatron_ext.train.preflight import preflight

    result = preflight(cfg, world_size, scan_tokens=scan_tokens)
    layout = result.layout
    dp = layout.dp_replicate * layout.dp_shard
    summary = (f"world {world_size} = dp {dp} (replicate {layout.dp_replicate} x shard {layout.dp_shard}) x "
               f"tp {layout.tp} x pp {layout.pp}; grad accumulation {result.grad_accum}")
    return [summary, *result.notes]
