"""Expert parallelism: a mixture of experts' experts sharded over ranks, tokens exchanged all-to-all.

Model-agnostic: `apply_expert_parallel` takes an experts module whose stacked parameters have the expert index as
dim 0 and whose forward is `experts(tokens sorted by expert [m, dim], group sizes [n_experts]) -> [m, dim]` (the
interface of `megatron_ext.models.mixtral.GroupedExperts`). It shards the parameters (DTensor `Shard(0)` over the
ep mesh: rank r holds experts [r x E/ep, (r+1) x E/ep)) and wraps the forward, as Megatron's and TorchTitan's
all-to-all token dispatchers do:
1. dispatch: every rank sends each destination the rows for that rank's experts (one all-to-all of the group sizes,
   one of the tokens) and regroups what it receives by local expert;
2. the local experts run on their groups;
3. combine: the inverse regrouping and all-to-all back; the caller weights and sums as without EP.

The ep ranks are carved from the data-parallel ones: ep consecutive ranks of dp_shard (so an ep group never spans
dp_replicate, usually the slower inter-node dimension; ep must divide dp_shard). With D = dp_replicate x dp_shard
data-parallel ranks (all of them see different tokens) and D > ep, the D ranks form D/ep groups of ep ranks, each
holding all experts once: mesh ("edp", "ep") unflattened from the dp ranks (dp_replicate outer, dp_shard inner,
so dp rank = edp x ep + ep rank), parameters [Replicate(), Shard(0)]. "edp" thus spans both the other dp_shard
groups (ep < dp_shard) and the HSDP replicas (dp_replicate > 1): the experts' gradients are all-reduced over it, one
all-reduce for both, as they are computed (FSDP/HSDP leaves these parameters alone). The global grad norm counts
each expert parameter once: its shard is replicated over edp (and tp), and `parallel.grads.clip_grad_norm_` weighs a
replicated shard by 1/replicas.

Gradients: data parallelism averages over ranks (each rank's loss is the mean over its own tokens), but an expert's
weight gradient sums contributions of every rank's tokens of its ep group (and over edp). The combine step therefore
scales the gradient flowing into the experts by 1/D and the dispatch step undoes it for the gradient flowing back to
the tokens: expert gradients = the mean over all D ranks, token gradients unchanged (exact for power-of-two D).
"""

from __future__ import annotations

import torch
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    out = all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return out.wait() if hasattr(out, "wait") else out


class _Dispatch:
    """The all-to-all exchange of one forward (state shared by the pre- and post-hook of the experts module)."""

    def __init__(self, group, ep: int, grad_divisor: int):
        self.group, self.ep, self.grad_divisor = group, ep, grad_divisor
        self.pending: list[tuple[torch.Tensor, list[int], list[int]]] = []

    def dispatch(self, module, args):
        import torch.distributed as dist

        x, group_sizes = args
        ep = self.ep
        local_experts = group_sizes.numel() // ep
        # recv_sizes[r, j]: rows rank r sends for my local expert j
        recv_sizes = torch.empty_like(group_sizes)
        dist.all_to_all_single(recv_sizes, group_sizes.contiguous(), group=self.group)
        recv_sizes = recv_sizes.view(ep, local_experts)
        input_splits = group_sizes.view(ep, local_experts).sum(dim=1).tolist()
        output_splits = recv_sizes.sum(dim=1).tolist()
        received = _all_to_all(x, output_splits, input_splits, self.group)  # by source rank, then local expert
        # regroup by local expert (stable: source rank order inside a group)
        block = torch.arange(ep * local_experts, device=x.device).view(ep, local_experts)
        block_key = (block % local_experts) * ep + block // local_experts  # (r, j) -> j * ep + r
        row_key = torch.repeat_interleave(block_key.flatten(), recv_sizes.flatten())
        order = torch.argsort(row_key, stable=True)
        self.pending.append((order, input_splits, output_splits))
        local = _ScaleGrad.apply(received[order], float(self.grad_divisor))
        return local, recv_sizes.sum(dim=0)

    def combine(self, module, args, out):
        order, input_splits, output_splits = self.pending.pop()
        out = _ScaleGrad.apply(out, 1.0 / self.grad_divisor)
        back = torch.empty_like(out)
        back = back.index_copy(0, order, out)  # undo the regrouping (differentiable)
        return _all_to_all(back, input_splits, output_splits, self.group)


def expert_mesh(dp_mesh, ep: int):
    """(mesh, index of its ep dim) for the experts. `dp_mesh`: the root mesh's data-parallel dims, "dp_shard" or
    ("dp_replicate", "dp_shard") under HSDP, then "tp" under tensor parallelism (the MoE is replicated over tp).
    The data-parallel dims become "ep" when ep is all of them, else ("edp", "ep"): ep consecutive dp ranks share one
    copy of all experts, replicated over edp (the other dp_shard groups and, under HSDP, the replicas)."""
    names = dp_mesh.mesh_dim_names
    if names[0] == "dp_replicate":  # merge (dp_replicate, dp_shard) into one dp dim: one edp group reduces both
        sizes = (dp_mesh.size(0) * dp_mesh.size(1) // ep, ep) + tuple(dp_mesh.mesh.shape[2:])
        merged = dp_mesh._flatten("_".join(names))  # a new mesh, not a slice of the root's flattened "dp"
        return merged._unflatten(0, sizes, ("edp", "ep") + tuple(names[2:])), 1
    if dp_mesh.size(0) == ep:
        return dp_mesh, 0
    return dp_mesh._unflatten(0, (dp_mesh.size(0) // ep, ep), ("edp", "ep")), 1


def apply_expert_parallel(experts: nn.Module, mesh, ep_dim: int) -> set[nn.Parameter]:
    """Shard `experts` over dim `ep_dim` of `mesh` (from `expert_mesh`; replicated over its other dims) and route its
    forward through all-to-all; returns its parameters (for FSDP to leave alone)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    ep = mesh.size(ep_dim)
    placements = [Replicate()] * mesh.ndim
    placements[ep_dim] = Shard(0)
    for name, param in list(experts.named_parameters(recurse=False)):
        if param.shape[0] % ep:
            raise ValueError(f"expert parallel: {name} has {param.shape[0]} experts, not divisible by ep={ep}")
        full = param.detach().to_local() if isinstance(param, DTensor) else param.data  # tp: replicated
        sharded = nn.Parameter(distribute_tensor(full, mesh, placements, src_data_rank=None),
                               requires_grad=param.requires_grad)
        setattr(experts, name, sharded)
    dp_size = ep * (mesh.size(0) if ep_dim == 1 else 1)
    exchange = _Dispatch(mesh.get_group(ep_dim), ep, grad_divisor=dp_size)
    if ep_dim == 1:  # each edp replica (dp_shard group, HSDP replica) saw other tokens: sum their 1/D-scaled grads
        edp_group = mesh.get_group(0)

        def all_reduce_over_edp(grad):
            # on a contiguous copy: the GEMM backward hands over transposed views, which a collective would reduce
            # into a temporary and not write back
            local = grad.to_local().contiguous()
            dist.all_reduce(local, group=edp_group)
            return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False)

        hooked: set[int] = set()

        def hook_parameters(module, args):
            # at forward time, not now: materialising the meta model (`to_empty`) replaces the parameter objects
            for p in module.parameters(recurse=False):
                if id(p) not in hooked and p.requires_grad:
                    p.register_hook(all_reduce_over_edp)
                    hooked.add(id(p))

        experts.register_forward_pre_hook(hook_parameters)
    experts.register_forward_pre_hook(exchange.dispatch)
    experts.register_forward_hook(exchange.combine)
    return set(experts.parameters(recurse=False))
