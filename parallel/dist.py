"""Process-group start-up from torchrun or SLURM environment variables.

torchrun (and `hibari launch local`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun`
only SLURM_* variables exist; `hibari.env` translates them (the one place for those rules).
One process without any of them is a valid world of size 1: no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hibari.env import resolve_env


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group


def _device_for(local_rank: int, backend: str | None) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join (or describe) the job's process group. backend: None = nccl with CUDA, gloo without."""
    if dist.is_available() and dist.is_initialized():  # e.g. tests that built the group themselves
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        be = dist.get_backend()
        return DistInfo(rank, world, local_rank, _device_for(local_rank, be), be)
    env = resolve_env(os.environ)
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _device_for(local_rank, backend)
    if world == 1:
        return DistInfo(0, 1, local_rank, device, None)
    os.environ.update(env)  # init_process_group's env:// reads these
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device, backend)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
