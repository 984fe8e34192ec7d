"""Mixtral: the Mistral decoder of `llama.py` with a sparse mixture of SwiGLU experts as every block's MLP.

Per block: a router (linear dim -> n_experts) scores each token; softmax in fp32, the top-k experts are kept and their
probabilities renormalised to sum to one (Hugging Face `MixtralTopKRouter`); each token's output is the weighted sum
of its k experts' SwiGLU outputs. Token dispatch has no Python loop over tokens:
1. the token->expert assignments are sorted by expert (a stable argsort, so tokens keep their order in a group);
2. the experts run as grouped GEMMs over the contiguous groups (`torch._grouped_mm` where the dtype, device and
   strides allow it, else one GEMM per expert);
3. outputs are weighted and summed back to their tokens with one `index_add_`.
Dropless by default; with `moe_capacity_factor` each expert takes at most ceil(factor x tokens x k / n_experts)
assignments of the forward (the first ones in token order), the rest contribute nothing (the residual carries them).

The experts' weights are stacked per block (`experts.w1/w3` [n_experts, hidden, dim], `experts.w2`
[n_experts, dim, hidden]): grouped GEMMs read them as they are and expert parallelism (parallel/ep.py) shards
dim 0. `GroupedExperts.forward(tokens grouped by expert, group sizes)` is the seam expert parallelism hooks into.

Router losses (read after a forward with `router_losses()`):
- load balancing exactly as transformers' `load_balancing_loss_func` over all blocks of the forward:
  n_experts x sum_e (share of top-k assignments to e) x (mean router probability of e), the shares and means taken
  over every block's tokens together, times `router_aux_loss_coef`;
- z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, summed over blocks, times `router_z_loss_coef`.
Both are functions of per-block sums, so a pipeline stage (`pipeline_carry`) adds its blocks' sums to a "router
carry" tensor passed along with the hidden state, and the last stage computes the losses of the whole forward from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.models.llama import ModelArgs, Transformer, TransformerBlock


# the public name where this torch has it (2.13: F.grouped_mm), else the private op
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_ok(x: torch.Tensor, w_t: torch.Tensor) -> bool:
    """torch._grouped_mm runs here: bf16 on CUDA (and fp32 / bf16 on CPU), rows and columns 16-byte aligned."""
    if _GROUPED_MM is None or x.dtype != w_t.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16)
    else:
        ok_dtype = x.device.type == "cuda" and x.dtype == torch.bfloat16
    align = 16 // x.element_size()
    return ok_dtype and x.shape[-1] % align == 0 and w_t.shape[-1] % align == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [tokens, in] grouped by expert (group g = the next group_sizes[g] rows) times weight[g].T
    (weight [groups, out, in], nn.Linear layout) -> [tokens, out]."""
    w_t = weight.transpose(-2, -1)
    if x.shape[0] == 0:  # keep the graph: under expert parallel the backward must still reach the all-to-all
        return x @ w_t[0]  # (a rank that received no tokens would otherwise skip the collective and hang its peers)
    if _grouped_mm_ok(x, w_t):
        offsets = torch.cumsum(group_sizes, dim=0).to(torch.int32)
        out = _GROUPED_MM(x, w_t, offs=offsets)
        if out.requires_grad:  # its backward rejects expanded (stride-0) gradients, e.g. from a .sum()
            out.register_hook(lambda grad: grad.contiguous())
        return out
    chunks = torch.split(x, group_sizes.tolist())
    return torch.cat([chunk @ w_t[g] for g, chunk in enumerate(chunks)])


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: expert parallel shards the experts and tensor parallel replicates the MoE's
    weights as DTensors (megatron_ext/models/mixtral_parallel.py); the MoE itself computes on plain tensors."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


class GroupedExperts(nn.Module):
    """n SwiGLU experts with stacked weights: w2(silu(w1 x) * w3 x) per expert.

    A quantized precision recipe (`megatron_ext.precision.apply_precision`) sets `recipe` (one recipe per expert and
    weight) and `mode` ("quantized" | "forward_only" | "bf16"): every expert GEMM then runs as a quantized linear of
    its own (`megatron_ext/precision/grouped.py`); without a recipe, or in mode "bf16", the grouped GEMMs below.
    A recipe with persistent state (fp8_delayed) gets it as buffers when set (`amax_history`, `amax_count`: one
    dense layer's state per expert and weight), so the state_dict and checkpoints hold it."""

    grouped_weights = ("w1", "w3", "w2")  # stacked [n_experts, out, in]: what a precision recipe quantizes

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # down
        self.recipe = None  # megatron_ext.precision.grouped.ExpertRecipes under a quantized recipe
        self.mode = "bf16"

    @property
    def recipe(self):
        return self._recipe

    @recipe.setter
    def recipe(self, holder) -> None:
        self._recipe = holder
        if holder is not None and holder.has_state:  # on the weights' device (meta: `init_buffers` after to_empty)
            from megatron_ext.precision.grouped import STATE_BUFFERS  # noqa: PLC0415

            for name, t in zip(STATE_BUFFERS, holder.new_state(self.w1.shape[0], self.w1.device)):
                self.register_buffer(name, t, persistent=True)

    def init_buffers(self) -> None:
        """Fresh recipe state after `to_empty` (the parallel plan calls it after materializing the model)."""
        with torch.no_grad():
            for buf in self.buffers(recurse=False):
                buf.zero_()

    def extra_repr(self) -> str:
        return "" if self.recipe is None else f"recipe={self.recipe.name}, mode={self.mode}"

    def forward(self, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """x [tokens, dim] sorted by expert, group_sizes [n_experts] (sums to tokens) -> [tokens, dim]."""
        if self.recipe is not None and self.mode != "bf16":
            from megatron_ext.precision.grouped import quantized_experts_forward  # noqa: PLC0415

            return quantized_experts_forward(self, x, group_sizes)
        w1, w3, w2 = (_local(w) for w in (self.w1, self.w3, self.w2))
        # compute dtype: autocast's, else the activations' (FSDP's bf16 params leave expert-parallel weights fp32)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x, w1, w3, w2 = x.to(dtype), w1.to(dtype), w3.to(dtype), w2.to(dtype)
        h = F.silu(grouped_linear(x, w1, group_sizes)) * grouped_linear(x, w3, group_sizes)
        return grouped_linear(h, w2, group_sizes)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)


@dataclass
class RouterStats:
    """One block's routing in the last forward: the inputs of the load-balancing and z losses."""

    assignments: torch.Tensor  # [n_experts] top-k assignments per expert (fp32, no gradient)
    prob_sum: torch.Tensor  # [n_experts] router probabilities summed over tokens (fp32, differentiable)
    tokens: int
    z_loss: torch.Tensor  # mean logsumexp(logits)^2 (fp32, differentiable)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
    """Router logits [tokens, n_experts] -> (weights [tokens, k] fp32, expert ids [tokens, k], stats): softmax in
    fp32 over all experts, top-k, renormalised over the k (transformers' MixtralTopKRouter)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, expert_ids = torch.topk(probs, top_k, dim=-1)
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    stats = RouterStats(assignments=torch.bincount(expert_ids.reshape(-1), minlength=logits.shape[-1]).float(),
                        prob_sum=probs.sum(dim=0), tokens=logits.shape[0],
                        z_loss=torch.logsumexp(logits.float(), dim=-1).square().mean())
    return weights, expert_ids, stats


def sort_by_expert(expert_ids: torch.Tensor, n_experts: int, capacity: int | None):
    """expert_ids [tokens, k] -> (assignment order sorted by expert [m], group sizes [n_experts]); an assignment is
    token * k + slot. With a capacity, assignments past it in their expert's group are left out (m < tokens x k)."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    group_sizes = torch.bincount(flat, minlength=n_experts)
    if capacity is not None:
        starts = torch.cumsum(group_sizes, 0) - group_sizes
        position = torch.arange(flat.numel(), device=flat.device) - starts.repeat_interleave(group_sizes)
        order = order[position < capacity]
        group_sizes = group_sizes.clamp(max=capacity)
    return order, group_sizes


class SparseMoE(nn.Module):
    """Top-k routed mixture of `GroupedExperts` (Hugging Face `MixtralSparseMoeBlock` numerics)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.n_experts_per_tok
        self.capacity_factor = args.moe_capacity_factor
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = GroupedExperts(args.n_experts, args.dim, args.ffn_hidden_dim)
        self.stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, expert_ids, self.stats = route(F.linear(flat, _local(self.router.weight)), self.top_k)

        capacity = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * flat.shape[0] * self.top_k / self.n_experts)
        order, group_sizes = sort_by_expert(expert_ids, self.n_experts, capacity)
        token_of = order // self.top_k
        # index_select, not flat[token_of]: its backward is one index_add_ (advanced indexing's is a slow scatter)
        out_sorted = self.experts(flat.index_select(0, token_of), group_sizes)
        out_sorted = out_sorted * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, token_of, out_sorted.to(flat.dtype))
        return out.view(shape)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std, out_std)


class MixtralBlock(TransformerBlock):
    def build_feed_forward(self, args: ModelArgs) -> nn.Module:
        return SparseMoE(args)


@dataclass
class RouterLosses:
    """Router losses of the last forward over this module's blocks (coefficients applied in `total`)."""

    load_balancing: torch.Tensor  # HF load_balancing_loss_func value (before the coefficient)
    z_loss: torch.Tensor  # summed over blocks (before the coefficient)
    total: torch.Tensor  # router_aux_loss_coef x load_balancing + router_z_loss_coef x z_loss
    expert_load: torch.Tensor  # [blocks, n_experts] top-k assignments per expert (no gradient)


class MixtralTransformer(Transformer):
    """`Transformer` whose blocks are `MixtralBlock`s; call `router_losses()` after a forward.

    As a pipeline stage (`pipeline_carry` set): called as stage(tokens or hidden, [router carry], document_ids=...),
    returns (logits or hidden, router carry) with this stage's blocks' statistics added (`add_router_carry`)."""

    block_class = MixtralBlock
    pipeline_carry = False

    def __init__(self, args: ModelArgs):
        if args.arch != "mixtral":
            raise ValueError(f"MixtralTransformer needs arch mixtral, got {args.arch!r}")
        super().__init__(args)

    def forward(self, tokens: torch.Tensor, *carry: torch.Tensor, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        if carry and not self.pipeline_carry:
            raise TypeError("MixtralTransformer.forward: a router carry is only taken by a pipeline stage")
        out = super().forward(tokens, document_ids=document_ids, position_ids=position_ids)
        if not self.pipeline_carry:
            return out
        stats = {int(key): block.feed_forward.stats for key, block in self.layers.items()}
        return out, add_router_carry(carry[0] if carry else None, stats, self.args)

    def router_losses(self) -> RouterLosses | None:
        """Losses of the blocks this module holds (all of them; a pipeline stage: its own); None before a forward."""
        stats = [block.feed_forward.stats for block in self.layers.values()]
        if not stats or any(s is None for s in stats):
            return None
        return router_losses(stats, self.args)


def router_losses(stats: list[RouterStats], args: ModelArgs) -> RouterLosses:
    assignments = torch.stack([s.assignments for s in stats])
    tokens = sum(s.tokens for s in stats)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(dim=0)
    z_loss = torch.stack([s.z_loss for s in stats]).sum()
    return _losses(assignments, prob_sum, tokens, z_loss, args)


def add_router_carry(carry: torch.Tensor | None, stats: dict[int, RouterStats], args: ModelArgs) -> torch.Tensor:
    """carry + the statistics of blocks {block id: stats} (carry None: zeros). The carry is one fp32 vector
    [n_layers x n_experts assignments (row = block id), n_experts router probability sums, tokens, z-loss sum]:
    everything the losses of a forward need, summed over blocks; the probability and z sums carry the gradient."""
    n_layers, n_experts = args.n_layers, args.n_experts
    ref = next(iter(stats.values())).prob_sum
    rows = torch.tensor(sorted(stats), device=ref.device)
    assignments = torch.zeros(n_layers, n_experts, device=ref.device).index_copy(
        0, rows, torch.stack([stats[i].assignments for i in sorted(stats)]))
    added = torch.cat([assignments.flatten(), torch.stack([s.prob_sum for s in stats.values()]).sum(dim=0),
                       ref.new_tensor([float(sum(s.tokens for s in stats.values()))]),
                       torch.stack([s.z_loss for s in stats.values()]).sum().reshape(1)])
    return added if carry is None else carry + added


def router_losses_from_carry(carry: torch.Tensor, args: ModelArgs) -> RouterLosses:
    """The router losses of a whole forward from the carry its last pipeline stage returned."""
    n = args.n_layers * args.n_experts
    assignments = carry[:n].view(args.n_layers, args.n_experts)
    return _losses(assignments, carry[n:n + args.n_experts], carry[-2], carry[-1], args)


def _losses(assignments, prob_sum, tokens, z_loss, args: ModelArgs) -> RouterLosses:
    """transformers' load_balancing_loss_func from per-expert totals over the blocks (`tokens`: summed over blocks)."""
    load_balancing = args.n_experts * torch.sum((assignments.sum(dim=0) / tokens) * (prob_sum / tokens))
    total = args.router_aux_loss_coef * load_balancing
    if args.router_z_loss_coef:
        total = total + args.router_z_loss_coef * z_loss
    return RouterLosses(load_balancing=load_balancing, z_loss=z_loss, total=total, expert_load=assignments)

