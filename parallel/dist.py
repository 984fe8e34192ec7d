"""Process-group start-up from torchrun or SLURM environment variables.

torchrun (and `hibari launch local`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun`
only SLURM_* variables exist; `hibari.env` translates them (the one place for those rules).
One process without any of them is a valid world of size 1: no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hibari.env import resolve_env
from hibari.errors import HibariError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group


def cuda_env(tp: int, dp: int) -> dict[str, str]:
    """Environment a GPU job should start its ranks with (launchers add it; values the user set win).

    expandable_segments: fewer fragmentation OOMs with changing activation shapes. CUDA_DEVICE_MAX_CONNECTIONS=1
    orders TP/SP communication kernels before compute (Megatron practice) but serialises FSDP2's overlapped
    all-gathers / reduce-scatters with compute: only for TP without data parallelism.
    """
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if tp > 1 and dp == 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def check_gpus_per_node(local_ranks: int, gpus: int | None = None) -> None:
    """One-line HibariError when a node would run more NCCL ranks than it has GPUs (NCCL refuses two ranks on one
    device). gpus: default torch.cuda.device_count(); no check without CUDA (gloo/CPU runs any number)."""
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local_ranks > gpus:
        raise HibariError(f"{local_ranks} ranks per node but this node has {gpus} GPU(s): NCCL needs one GPU per "
                          f"rank; use --nproc {gpus} (or at most {gpus} tasks per node), or run on CPU with gloo")


def _device_for(local_rank: int, backend: str | None) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _prepare_cuda(device: torch.device, local_ranks: int) -> None:
    """Before the first CUDA call of the process: allocator settings, one GPU per rank, TF32 for fp32 matmuls."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    check_gpus_per_node(local_ranks)
    torch.cuda.set_device(device)  # also for one process: later `torch.device("cuda")` means this GPU
    # fp32 matmuls (fp32 recipe, fp32 parts of the others) on tensor cores; bf16/fp8 GEMMs are unaffected
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def init_distributed(backend: str | None = None, timeout_minutes: int = 60, layout=None) -> DistInfo:
    """Join (or describe) the job's process group. backend: None = nccl with CUDA, gloo without.

    layout: the resolved `parallel:` config (duck-typed: tp, dp_replicate, dp_shard, timeout_minutes); its timeout
    wins over `timeout_minutes`, and on CUDA its `cuda_env` defaults are applied to this process.
    """
    if layout is not None:
        timeout_minutes = layout.timeout_minutes
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
    if device.type == "cuda":
        if layout is not None:
            for key, value in cuda_env(layout.tp, layout.dp_replicate * layout.dp_shard).items():
                os.environ.setdefault(key, value)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        _prepare_cuda(device, max(local_ranks, local_rank + 1))
    if world == 1:
        return DistInfo(0, 1, local_rank, device, None)
    os.environ.update(env)  # init_process_group's env:// reads these
    # the default 10-minute timeout kills jobs while rank 0 alone builds index caches or prunes checkpoints
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device, backend)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
