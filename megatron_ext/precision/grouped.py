"""Quantized grouped GEMMs of a mixture of experts: every expert's GEMM is a linear layer of its own under the recipe.

A grouped-experts module (`megatron_ext.models.mixtral.GroupedExperts`) holds stacked weights [n_experts, out, in]
named in its `grouped_weights` and runs on tokens sorted by expert with per-expert group sizes. Under a quantized
recipe each expert's slice of each GEMM runs through `quantized_linear` exactly as a dense block linear does (fprop,
dgrad and wgrad quantized per expert: the per-tensor amaxes are those of that expert's tokens and weight), as
TransformerEngine's GroupedLinear quantizes per group with host-side m_splits:

- one Recipe object per (block, weight, GLOBAL expert index), seeded by `<block>.feed_forward.experts.<w>.<e>`, so
  expert parallelism (a rank holds experts [r E/ep, (r+1) E/ep)) picks the very recipes one process would use;
- the stochastic-rounding key is (that seed, role, step, micro-batch, expert-replica rank, call): the call counter is
  per expert (`ExpertRoundingContext`), and the data-parallel part of the key is dp_rank // ep (the replica of the
  experts the rank belongs to; 0 for all ep ranks of one replica, which together hold each expert once and see the
  tokens of all of them), so EP draws the same noise as one process running all experts on the same tokens;
- empty groups are skipped (their weight gradient is zero);
- ONE host sync per MoE forward: the group sizes (`tolist`) split the tokens for the three GEMMs and their backward
  (expert parallelism already syncs for its all-to-all splits).

fp8_delayed: each expert GEMM keeps its own amax history and use counts, buffers of the experts module
(`amax_history` [n_experts, 3 weights (w1, w3, w2), roles, len], `amax_count` [n_experts, 3, roles]; in the
state_dict, so checkpoints restore them), passed to its quantized_linear as the layer state. With a dp group
(set_step_context) the amaxes are MAX-reduced over it, as for a dense layer; since experts see different tokens on
each rank, the group sizes are first SUM-reduced over dp (one collective and host sync per MoE forward): an
expert no rank routed to is skipped everywhere (its history does not advance, as in one process) and one with tokens
elsewhere runs on a zero row here (amax 0), so every rank makes the same collectives and holds the same history.
Expert parallelism with fp8_delayed is refused (the history would have to be sharded with the experts and reduced
over "edp").
The te / torchao backends swap nn.Linear modules only: refused with one line.
The bf16 / fp32 path (no recipe, or mode "bf16") is the model's own grouped GEMM, untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hibari.errors import HibariError
from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.precision.linear import MODES, RECIPES, quantized_linear
from megatron_ext.precision.rounding import _ROLE_IDS, RoundingContext, combine_key

UNSUPPORTED_BACKENDS = ("te", "torchao")
UNSUPPORTED_RECIPES: tuple[str, ...] = ()
EP_UNSUPPORTED_RECIPES = ("fp8_delayed",)  # per-expert amax histories are not sharded with the experts
STATE_BUFFERS = ("amax_history", "amax_count")


def is_grouped_experts(mod) -> bool:
    """A module with stacked expert weights the recipes quantize (the `grouped_weights` protocol)."""
    return bool(getattr(mod, "grouped_weights", None))


def check_experts_supported(cfg: PrecisionConfig, name: str) -> None:
    if cfg.recipe in UNSUPPORTED_RECIPES:
        raise HibariError(f"precision.recipe={cfg.recipe} is not supported for the grouped expert GEMMs of {name} "
                          f"(per-expert amax histories); use fp8_tensorwise, fp8_rowwise, mxfp8 or nvfp4")
    if cfg.backend in UNSUPPORTED_BACKENDS:
        raise HibariError(f"precision.backend={cfg.backend} swaps nn.Linear modules only, not the grouped expert "
                          f"GEMMs of {name}; use backend auto, emulated or scaled_mm")


def expert_sizes(mod) -> list[tuple[str, int, int]]:
    """(weight name, in, out) of each stacked expert weight [n_experts, out, in]."""
    return [(w, getattr(mod, w).shape[2], getattr(mod, w).shape[1]) for w in mod.grouped_weights]


def moe_high_precision_linears(block) -> set[str]:
    """Names (inside `block`) of the nn.Linear modules next to a grouped-experts module: the MoE router, kept in
    high precision (its scores pick the experts; Megatron and TransformerEngine keep it unquantized too)."""
    parents = {name.rpartition(".")[0] for name, mod in block.named_modules() if is_grouped_experts(mod)}
    return {name for name, mod in block.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[0] in parents}


class ExpertRoundingContext(RoundingContext):
    """One per MoE block, shared by its experts' recipes (so `set_step_context` reaches them all through
    `ExpertRecipes.rounding`). Calls are counted per (expert seed, role): an expert's draws do not depend on which
    other experts ran before it on this rank. `ep`: the number of expert shards (set at each forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ep = 1

    def next_key(self, layer_seed: int, role: str) -> int:
        slot = (layer_seed, role)
        call = self.calls.get(slot, 0)
        self.calls[slot] = call + 1
        return combine_key(layer_seed, _ROLE_IDS[role], self.step, self.micro_batch, self.dp_rank // self.ep, call)


class ExpertRecipes:
    """The recipes of one MoE block's experts: `recipes[weight][global expert]`. Duck-types a layer's recipe for
    `set_step_context` (`rounding`, `dp_group`, handed on to every expert's recipe) and extra_repr (`name`)."""

    def __init__(self, cfg: PrecisionConfig, seeds: dict[str, list[int]]):
        self.name = cfg.recipe
        self.rounding = ExpertRoundingContext()
        self.recipes = {w: [RECIPES[cfg.recipe](cfg, s) for s in ss] for w, ss in seeds.items()}
        self.has_state = RECIPES[cfg.recipe].has_state
        self.dp_group = None
        for rs in self.recipes.values():
            for r in rs:
                r.rounding = self.rounding

    @property
    def dp_group(self):
        return self._dp_group

    @dp_group.setter
    def dp_group(self, group) -> None:
        self._dp_group = group
        for rs in self.recipes.values():
            for r in rs:
                r.dp_group = group

    def new_state(self, n_experts: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(amax_history [n_experts, weights, roles, len], amax_count [n_experts, weights, roles]): one dense
        layer's state (`Recipe.new_state`) per (expert, weight)."""
        hist, count = next(iter(self.recipes.values()))[0].new_state(device)
        lead = (n_experts, len(self.recipes))
        return hist.expand(*lead, *hist.shape).clone(), count.expand(*lead, *count.shape).clone()


def _local_experts(weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's stacked experts, global index of its first expert, number of expert shards). Expert parallel
    shards dim 0 (a DTensor Shard(0) on the ep mesh dim); tensor parallel replicates (Replicate DTensor)."""
    if not hasattr(weight, "to_local"):
        return weight, 0, 1
    local = weight.to_local()
    offset = 0
    for dim, placement in enumerate(weight.placements):
        if placement.is_shard(0):
            offset = weight.device_mesh.get_local_rank(dim) * local.shape[0]
    return local, offset, weight.shape[0] // max(local.shape[0], 1)


def grouped_quantized_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int], recipes: list, mode: str,
                             out_dtype: torch.dtype, states: list | None = None,
                             run_empty: list[bool] | None = None) -> torch.Tensor:
    """Rows of x [tokens, in] grouped by expert (group g: the next sizes[g] rows) times weight[g]^T under
    recipes[g] (weight [groups, out, in], plain tensor) -> [tokens, out] in out_dtype. unbind/split/cat keep the
    autograd graph cheap (one stack of the expert gradients, no per-expert full-size scatter). `states[g]`: group
    g's recipe state (fp8_delayed); `run_empty[g]`: an empty group runs on one zero row anyway (its output dropped,
    its zero gradient still flowing back), so its recipe records the same uses as on the ranks where it has tokens."""
    ws = weight.unbind(0)
    states = states or [None] * len(sizes)
    outs = []
    for g, chunk in enumerate(torch.split(x, sizes)):
        if sizes[g]:
            outs.append(quantized_linear(chunk, ws[g], recipes[g], mode, state=states[g]))
        elif run_empty and run_empty[g]:
            pad = x.new_zeros(1, x.shape[1]).requires_grad_(x.requires_grad)
            outs.append(quantized_linear(pad, ws[g], recipes[g], mode, state=states[g])[:0])
    if not any(sizes):  # no tokens: an empty product keeps the graph (expert parallel's backward all-to-all must run)
        return torch.cat([(x @ weight[0].t().to(x.dtype)), *outs]).to(out_dtype)  # EP weights may stay fp32
    return torch.cat(outs).to(out_dtype)


def _dp_active(sizes: list[int], device, group) -> list[bool]:
    """Which experts have tokens on some rank of the dp `group` (one SUM all-reduce of the group sizes)."""
    if group is None:
        return [s > 0 for s in sizes]
    total = torch.tensor(sizes, dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)
    return [s > 0 for s in total.tolist()]


def _expert_states(experts, offset: int, n_local: int, holder: ExpertRecipes) -> dict[str, list] | None:
    """Per weight, each local expert's (history [roles, len], count [roles]) views of the module's buffers."""
    if not holder.has_state:
        return None
    hist, count = (getattr(experts, n) for n in STATE_BUFFERS)
    hist, count = (t.to_local() if hasattr(t, "to_local") else t for t in (hist, count))  # tp: Replicate
    return {w: [(hist[e, i], count[e, i]) for e in range(offset, offset + n_local)]
            for i, w in enumerate(holder.recipes)}


def quantized_experts_forward(experts, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts w2(silu(w1 x) * w3 x) with every expert GEMM under the module's recipes (`experts.recipe`,
    `experts.mode` "quantized" | "forward_only"); output in the autocast dtype, else x's."""
    mode = experts.mode
    if mode not in MODES:
        raise ValueError(f"{type(experts).__name__}.mode must be one of {MODES}, got {mode!r}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    holder: ExpertRecipes = experts.recipe
    (w1, offset, shards), (w3, _, _), (w2, _, _) = (_local_experts(getattr(experts, w)) for w in ("w1", "w3", "w2"))
    holder.rounding.ep = shards
    if holder.has_state and shards > 1:
        raise HibariError(f"precision.recipe={holder.name} is not supported with expert parallel (parallel.ep="
                          f"{shards}): per-expert amax histories are not sharded; use parallel.ep=1")
    sizes = group_sizes.tolist()  # the one host sync of the MoE forward (backward reuses the split sizes)
    states = _expert_states(experts, offset, w1.shape[0], holder)
    run_empty = None
    if states is not None:  # fp8_delayed: every dp rank runs the experts some rank has tokens for
        run_empty = _dp_active(sizes, x.device, holder.dp_group)

    def gemm(inp, w, name):
        return grouped_quantized_linear(inp, w, sizes, holder.recipes[name][offset:offset + w.shape[0]], mode,
                                        out_dtype, states and states[name], run_empty)

    h = F.silu(gemm(x, w1, "w1")) * gemm(x, w3, "w3")
    return gemm(h, w2, "w2")
