"""Gradients across a layout: reducing pending partial sums and global-norm clipping, all on the device.

Nothing here reads a value back to the host: the norm stays a 0-d device tensor and clipping multiplies by a
clamped coefficient (1.0 when below the threshold) instead of branching on it in Python.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def reduce_partial_grads(params: Iterable[nn.Parameter]) -> None:
    """Reduce gradients left as pending sums (Partial DTensors) to their parameter's placements.

    The pipeline stages' backward leaves the gradients of sequence-parallel norm weights as Partial; the optimizer
    and clipping need them reduced (TP-only backward reduces them itself).
    """
    from torch.distributed.tensor import DTensor

    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


@torch.no_grad()
def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float, device: torch.device,
                    all_reduce: bool) -> torch.Tensor:
    """Global L2 norm of `grads` (this rank's, possibly DTensor shards) as a 0-d fp32 tensor on `device`; scales
    them in place to `max_norm` when above it (max_norm > 0).

    Each rank sums the squares of its local gradient shards, counting a shard replicated over k ranks as 1/k, and
    with `all_reduce` one all-reduce over the world adds everything up (dp, tp and pp at once).
    """
    from torch.distributed.tensor import DTensor

    locals_, weights = [], []
    for g in grads:
        if isinstance(g, DTensor):
            replicas = 1
            for dim, placement in enumerate(g.placements):
                if placement.is_replicate():
                    replicas *= g.device_mesh.size(dim)
            locals_.append(g.to_local())
            weights.append(1.0 / replicas)
        else:
            locals_.append(g)
            weights.append(1.0)
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if locals_:
        norms = torch.stack([n.float().to(device) for n in torch._foreach_norm(locals_, 2.0)])
        if all(w == 1.0 for w in weights):
            sq = norms.square().sum()
        else:
            sq = (norms.square() * torch.tensor(weights, device=device)).sum()
    if all_reduce:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    total = sq.sqrt()
    if max_norm > 0 and locals_:
        # same formula as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), at most 1
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for device_group in _by_device(locals_):
            torch._foreach_mul_(device_group, coef.to(device_group[0].device))
    return total


def _by_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return list(groups.values())
