"""Process-group start-up from torchrun or SLURM environment variables.

torchrun (and `hibari launch local`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun`
only SLURM_* variables exist, so they are translated to the torchrun names first (torchrun's win when both exist).
One process without any of them is a valid world of size 1: no process group is created.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from launch.errors import HibariError

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000  # MASTER_PORT = base + job id mod span: jobs sharing a node rarely collide
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: `n[1-3],gpu07` -> `n1`, `gpu[07-09]` -> `gpu07`, `a[2,5]-ib` -> `a2-ib`."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise HibariError("SLURM_JOB_NODELIST: empty nodelist")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first host expression
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    expr = nodelist[:end]

    def first_of_range(m: re.Match) -> str:
        first = m.group(1).split(",")[0]
        return first.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_range, expr)
    if not host or "[" in host or "]" in host:
        raise HibariError(f"SLURM_JOB_NODELIST: cannot parse nodelist {nodelist!r}")
    return host


def torchrun_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables derived from a SLURM task environment ({} when not under SLURM)."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    out["MASTER_ADDR"] = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    out["MASTER_PORT"] = str(SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN) if job_id else str(DEFAULT_PORT)
    return out


def resolve_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun env, else SLURM env, else a 1-process world."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    slurm = torchrun_env_from_slurm(env)
    resolved = {}
    for name in names:
        if env.get(name):
            resolved[name] = env[name]
        elif name in slurm and "RANK" not in env:  # never mix a torchrun rank with SLURM's
            resolved[name] = slurm[name]
    resolved.setdefault("RANK", "0")
    resolved.setdefault("WORLD_SIZE", "1")
    resolved.setdefault("LOCAL_RANK", "0")
    resolved.setdefault("MASTER_ADDR", "127.0.0.1")
    resolved.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if not resolved[name].isdigit():
            raise HibariError(f"environment variable {name}={resolved[name]!r}: expected a non-negative integer")
    if int(resolved["RANK"]) >= int(resolved["WORLD_SIZE"]):
        raise HibariError(f"environment: RANK {resolved['RANK']} is not below WORLD_SIZE {resolved['WORLD_SIZE']}")
    return resolved


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
