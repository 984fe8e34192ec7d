"""Model-agnostic layout helpers: DTensor replication, activation checkpointing, torch.compile, FSDP2, loading
full weights into sharded parameters, and the wrapper-prefix stripper.

A model's plan (`parallel.plan.ModelPlan`) says which submodules these apply to.
"""

from __future__ import annotations

import torch
from torch import nn

from hibari.errors import HibariError

# prefixes that activation checkpointing, torch.compile and FSDP1 insert into parameter names
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def strip_wrapper_prefixes(name: str) -> str:
    """A parameter name as the plain model spells it (the project's one wrapper-prefix stripper)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def replicate_module(module: nn.Module, tp_mesh) -> None:
    """Parameters -> Replicate DTensors (so every parameter is a DTensor); activations stay plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def input_fn(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def output_fn(mod, outputs, mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    distribute_module(module, tp_mesh, input_fn=input_fn, output_fn=output_fn)


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, every_n: int) -> None:
    """full: every block recomputed in backward; selective: every `every_n`-th block (by global id)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(blocks.items()):
        if mode == "full" or (mode == "selective" and int(key) % every_n == 0):
            blocks[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleDict) -> None:
    """Compile each block in place (FQNs unchanged, so checkpoints stay layout-independent)."""
    for block in blocks.values():
        block.compile(fullgraph=False)


def apply_fsdp(root: nn.Module, units: list[tuple[nn.Module, bool | None]], dp_mesh, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, cpu_offload: bool, reshard_after_forward: bool,
               ignored_params: set[nn.Parameter] | None = None) -> None:
    """FSDP2: each unit on its own (None = `reshard_after_forward`), then the root owning the rest.
    `ignored_params` (e.g. expert-parallel experts, already sharded over the dp ranks) are left alone."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if ignored_params:
        kw["ignored_params"] = ignored_params
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for module, reshard in units:
        fully_shard(module, reshard_after_forward=reshard_after_forward if reshard is None else reshard, **kw)
    # the root does not cast its inputs: token ids, activations the units cast themselves, and fp32 tensors a plan
    # carries between pipeline stages (MoE router statistics: counts and sums a bf16 cast would round)
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                           cast_forward_inputs=False)
    fully_shard(root, reshard_after_forward=reshard_after_forward, **kw)


@torch.no_grad()
def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy the slices of full (unsharded) tensors that belong to this rank into its local parameters.

    Local slicing only (`distribute_tensor(..., src_data_rank=None)`), no communication: every rank holds the
    same full state.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = []
    for name, param in model.named_parameters():
        key = strip_wrapper_prefixes(name)
        if key not in full_state:
            missing.append(key)
            continue
        full = full_state[key]
        if tuple(full.shape) != tuple(param.shape):
            raise HibariError(f"initial state: {key} has shape {tuple(full.shape)}, the model expects "
                              f"{tuple(param.shape)}")
        if isinstance(param, DTensor):
            shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(shard)
        else:
            param.copy_(full)
    if missing:
        raise HibariError(f"initial state: {len(missing)} parameter(s) missing, e.g. {missing[:3]}")


def to_plain(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
