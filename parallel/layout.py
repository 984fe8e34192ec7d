"""Checks that a parallel layout fits the world size and the model, before any process group exists."""

from __future__ import annotations

from hibari.errors import HibariError
from parallel.config import ParallelConfig

SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zb", "zbv")


def validate_layout(cfg: ParallelConfig, model_args, world_size: int) -> ParallelConfig:
    """The config with dp_shard and pp_microbatches resolved; HibariError (one line) when the layout cannot work."""
    fixed = cfg.dp_replicate * cfg.tp * cfg.pp
    if cfg.dp_shard == -1:
        if world_size % fixed:
            raise HibariError(f"parallel: world size {world_size} is not divisible by dp_replicate x tp x pp = "
                              f"{cfg.dp_replicate} x {cfg.tp} x {cfg.pp}")
        dp_shard = world_size // fixed
    else:
        dp_shard = cfg.dp_shard
    if dp_shard < 1 or fixed * dp_shard != world_size:
        raise HibariError(f"parallel: dp_replicate x dp_shard x tp x pp = {cfg.dp_replicate} x {cfg.dp_shard} x "
                          f"{cfg.tp} x {cfg.pp} = {fixed * dp_shard} does not equal the world size {world_size}")
    a = model_args
    if cfg.tp > 1:
        for field, value in (("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads),
                             ("ffn_hidden_dim", a.ffn_hidden_dim), ("vocab_size", a.vocab_size)):
            if value % cfg.tp:
                raise HibariError(f"parallel.tp={cfg.tp}: model.{field}={value} is not divisible by tp")
    if cfg.ep > 1:
        n_experts = getattr(a, "n_experts", None)
        if not n_experts:
            raise HibariError(f"parallel.ep={cfg.ep}: needs a mixture-of-experts model (model.arch: mixtral)")
        if n_experts % cfg.ep:
            raise HibariError(f"parallel.ep={cfg.ep}: model.n_experts={n_experts} is not divisible by ep")
        if dp_shard % cfg.ep:
            raise HibariError(f"parallel.ep={cfg.ep}: must divide dp_shard={dp_shard} (experts are sharded over ep "
                              f"ranks carved from the data-parallel ones)")
    v = cfg.pp_stages_per_rank
    if cfg.pp > 1:
        if cfg.pp_schedule in SINGLE_STAGE_SCHEDULES and v != 1:
            raise HibariError(f"parallel.pp_schedule={cfg.pp_schedule}: needs pp_stages_per_rank=1 (got {v}); "
                              "use interleaved_1f1b / interleaved_zb / zbv for virtual stages")
        if cfg.pp_schedule in ("interleaved_1f1b", "interleaved_zb") and v < 2:
            raise HibariError(f"parallel.pp_schedule={cfg.pp_schedule}: needs pp_stages_per_rank >= 2 (got {v})")
        if cfg.pp_schedule == "zbv" and v != 2:
            raise HibariError(f"parallel.pp_schedule=zbv: needs pp_stages_per_rank=2 (got {v})")
        stages = cfg.pp * v
        if a.n_layers % stages:
            raise HibariError(f"parallel: model.n_layers={a.n_layers} is not divisible by the {stages} pipeline "
                              f"stages (pp={cfg.pp} x pp_stages_per_rank={v})")
        if a.tie_embeddings:
            raise HibariError("parallel.pp > 1: tied embeddings (model.tie_embeddings) are not supported with "
                              "pipeline parallelism; use pp=1")
    else:
        v = 1
    microbatches = cfg.pp_microbatches or cfg.pp * v
    if cfg.pp > 1 and microbatches < cfg.pp:
        raise HibariError(f"parallel.pp_microbatches={microbatches}: needs at least pp={cfg.pp} microbatches")
    return cfg.model_copy(update={"dp_shard": dp_shard, "pp_stages_per_rank": v, "pp_microbatches": microbatches})
