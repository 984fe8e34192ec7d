"""Parallel layout configuration (the `parallel:` section of a training config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hibari.config import StrictModel


class ParallelConfig(StrictModel):
    # world = dp_replicate x dp_shard x pp x tp; HSDP when both dp dims > 1
    dp_replicate: int = Field(default=1, ge=1)
    dp_shard: int = Field(default=-1, ge=-1, description="-1: whatever the world size leaves")
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    ep: int = Field(default=1, ge=1, description="expert parallel (MoE models): experts sharded over ep ranks carved "
                                                 "from dp_shard, tokens exchanged all-to-all")
    sequence_parallel: bool = True  # with tp > 1: norms/residuals sharded on the sequence dimension
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocab-sharded logits, never gathered
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zbv", "interleaved_zb"] = "1f1b"
    pp_microbatches: int | None = Field(default=None, ge=1, description="default: pp x stages per rank")
    pp_stages_per_rank: int = Field(default=1, ge=1, description="virtual stages (interleaved / zero-bubble)")
    cpu_offload: bool = False  # FSDP2 parameter/gradient offload to CPU
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # gradient accumulation under FSDP2: false = reduce-scatter every micro-batch and accumulate sharded gradients;
    # true = one reduce-scatter per optimizer step, holding unsharded fp32 gradients meanwhile (+4 B/param per rank)
    fsdp_no_sync_accumulation: bool = False
    timeout_minutes: int = Field(default=60, ge=1, description="collective timeout (NCCL default would be 10)")
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    ac_every_n_layers: int = Field(default=2, ge=1, description="selective: checkpoint every n-th block")
    compile: bool = False  # torch.compile each block (GPU)
