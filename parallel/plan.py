"""What the engine needs to know about a model: the `ModelPlan` protocol.

`parallel/` imports no model. A model family ships its plan next to its code (e.g.
`megatron_ext/models/llama_parallel.py`): how the model splits into pipeline stages, which of its linears are
column- or row-wise under tensor parallelism, which submodules are FSDP units, how weights are initialised and what
to redo after materialising meta tensors. The engine applies the layout with the generic helpers in
`parallel/parallelize.py` and `parallel/pipeline.py`, calling the plan where the model's structure matters.

Conventions every plan keeps:
- a stage module is called as `stage(inputs, document_ids=...)` and returns logits (last stage) or hidden states;
  under PP it may return a tuple (logits or hidden states, *carry): the carry tensors become the next stage's extra
  positional inputs, and on the last stage the engine adds the plan's `pipeline_auxiliary_loss(carry)` to the loss
  (MoE router losses over all stages' blocks) and keeps the carries for `Engine.take_pipeline_carries`;
- `blocks(stage)` is the `nn.ModuleDict` of the repeated blocks (activation checkpointing and torch.compile wrap its
  entries in place; keys are global block ids, so parameter names do not depend on the layout);
- parameter names of `merged_view(parts)` are the model's canonical names (the training-checkpoint keys).

Optional methods the engine calls when a plan has them (mixture-of-experts models,
`megatron_ext/models/mixtral_parallel.py`): `apply_expert_parallel(stage, dp_mesh, ep) -> set of parameters`
(`dp_mesh`: "dp_shard", ("dp_replicate", "dp_shard") when dp_replicate > 1, + "tp" when tp > 1; shards the
experts, see `parallel/ep.py`; FSDP leaves the returned parameters alone), `auxiliary_loss(stage)`
(an extra loss of the forward just run, added to the cross-entropy before backward) and `step_metrics(engine)`
(device tensors for the step's metrics record, `Engine.model_metrics`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ModelPlan(Protocol):
    """Model-specific half of the parallel layout; the engine supplies meshes, order and materialisation."""

    args: object  # the architecture; `parallel.layout.validate_layout` reads n_layers, n_heads, n_kv_heads,
    # ffn_hidden_dim, vocab_size and tie_embeddings from it (blocks split evenly over pipeline stages)

    def num_params(self) -> int:
        """Total parameter count (decides between full-model and per-shard initialisation)."""

    def full_state_dict(self, seed: int) -> dict[str, torch.Tensor]:
        """A complete, seeded, unsharded CPU state dict (identical on every rank and for every layout)."""

    def build_stage(self, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
        """The model on the meta device holding only blocks `layer_ids` (+ embedding if first, head if last)."""

    def blocks(self, stage: nn.Module) -> nn.ModuleDict:
        """The stage's repeated blocks, keyed by global block id."""

    def apply_tensor_parallel(self, stage: nn.Module, tp_mesh, sequence_parallel: bool, loss_parallel: bool) -> None:
        """Shard the stage's parameters over `tp_mesh` (DTensor); every parameter must end up a DTensor."""

    def fsdp_units(self, stage: nn.Module) -> list[tuple[nn.Module, bool | None]]:
        """Submodules to wrap with FSDP2 before the stage root, each with its reshard-after-forward choice
        (None: the engine's default)."""

    def after_materialize(self, stage: nn.Module) -> None:
        """Called after `to_empty` and again after the weights are loaded (must be idempotent): re-tie shared
        parameters, recompute non-persistent buffers."""

    def init_weights(self, stage: nn.Module) -> None:
        """Random init of a materialised (possibly sharded) stage, for models too big for `full_state_dict`."""

    def merged_view(self, parts: list[nn.Module]) -> nn.Module:
        """This rank's stages as one module whose parameter names are the model's canonical names."""
