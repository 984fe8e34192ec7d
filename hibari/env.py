"""torchrun / SLURM environment translation: the one place for RANK, WORLD_SIZE, MASTER_ADDR/PORT rules.

torchrun (and `hibari launch local`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun`
only SLURM_* variables exist, so they are translated to the torchrun names first (torchrun's win when both exist).
Pure functions over a mapping: no process group, no torch.
"""

from __future__ import annotations

import re
from typing import Mapping

from hibari.errors import HibariError

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000  # MASTER_PORT = base + job id mod span: jobs sharing a node rarely collide
SLURM_PORT_SPAN = 20000


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
