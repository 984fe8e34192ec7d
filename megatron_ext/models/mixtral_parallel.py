"""The Mixtral parallel plan: the Llama plan (pipeline split, FSDP units, init, checkpoint view) plus the MoE parts.

- expert parallel (`parallel.ep`): each block's stacked experts sharded over ep ranks carved from dp_shard with
  all-to-all token dispatch (parallel/ep.py; replicated over tp); FSDP shards everything else over dp_shard;
- router losses: `auxiliary_loss` hands the engine router_aux_loss_coef x load balancing (+ z-loss) of the forward
  just run, added to the cross-entropy before backward; `step_metrics` reports their per-step means and the expert
  load (top-k assignments per expert and block, summed over the step's micro-batches and the dp ranks);
- tensor parallel: attention, embedding and head as for Llama; the MoE replicated over the tp ranks (gathered
  sequence in, this rank's slice out under sequence parallel), so the router losses are those of one process;
- pipeline parallel: the HF load-balancing loss spans all blocks of a forward, but it is a function of per-block
  sums, so every stage passes a fp32 "router carry" (megatron_ext/models/mixtral.py `add_router_carry`) on with its
  hidden state and adds its blocks' sums; the last stage's loss function adds `pipeline_auxiliary_loss(carry)` (the
  losses of the whole pipeline micro-batch) to the cross-entropy, and the gradient reaches earlier stages' routers
  through the carry's gradient: the same loss and gradients as one process running that micro-batch.
"""

from __future__ import annotations

import torch

from hibari.errors import HibariError
from megatron_ext.models.llama import ModelArgs
from megatron_ext.models.llama_parallel import LlamaPlan, apply_tensor_parallel, compute_dtype
from megatron_ext.models.mixtral import MixtralTransformer, router_losses_from_carry
from parallel import Engine
from parallel.dist import DistInfo


class MixtralPlan(LlamaPlan):
    """`parallel.plan.ModelPlan` for `megatron_ext.models.mixtral.MixtralTransformer`."""

    model_class = MixtralTransformer

    def __init__(self, args: ModelArgs, precision_cfg=None):
        if args.arch != "mixtral":
            raise HibariError(f"MixtralPlan: model.arch is {args.arch!r}, expected mixtral")
        if precision_cfg is not None and getattr(precision_cfg, "quantized", False):
            from megatron_ext.precision.grouped import check_experts_supported  # noqa: PLC0415

            check_experts_supported(precision_cfg, "mixtral")  # te/torchao: one-line refusal
        super().__init__(args, precision_cfg)
        self._sums: dict[str, torch.Tensor] = {}
        self._micro_steps = 0

    def build_stage(self, layer_ids: list[int], first: bool, last: bool) -> MixtralTransformer:
        stage = super().build_stage(layer_ids, first, last)  # the recipe reaches block linears and expert GEMMs
        stage.pipeline_carry = not (first and last)  # a stage maps (inputs, carry) -> (outputs, carry)
        return stage

    def apply_tensor_parallel(self, stage, tp_mesh, sequence_parallel: bool, loss_parallel: bool) -> None:
        """Attention, embedding and head as for Llama; each MoE replicated over the tp ranks (every rank routes and
        runs the experts on the whole micro-batch, so the router losses are those of one process)."""
        from torch.distributed.tensor import Replicate, Shard, distribute_module
        from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

        apply_tensor_parallel(stage, tp_mesh, sequence_parallel, loss_parallel, dense_mlp=False)
        for block in stage.layers.values():
            distribute_module(block.feed_forward, tp_mesh)  # parameters -> Replicate DTensors
            if sequence_parallel:  # gather the sequence in, hand back this rank's slice of it
                parallelize_module(block, tp_mesh, {"feed_forward": PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=False)})

    def apply_expert_parallel(self, stage: MixtralTransformer, dp_mesh, ep: int) -> set:
        """Each block's experts sharded over ep ranks of `dp_mesh` (all dp ranks, HSDP replicas included) and
        replicated over the rest; returns their parameters for FSDP to leave alone."""
        from parallel.ep import apply_expert_parallel, expert_mesh

        mesh, ep_dim = expert_mesh(dp_mesh, ep)
        ignored = set()
        for block in stage.layers.values():
            ignored |= apply_expert_parallel(block.feed_forward.experts, mesh, ep_dim)
        return ignored

    # ------------------------------------------------------------------------------------ router losses
    def auxiliary_loss(self, stage: MixtralTransformer) -> torch.Tensor | None:
        losses = stage.router_losses()
        if losses is None:
            return None
        if torch.is_grad_enabled():  # training micro-step: accumulate the step's statistics
            stats = {"aux_loss": losses.load_balancing.detach(), "z_loss": losses.z_loss.detach(),
                     "expert_load": losses.expert_load.detach()}
            for key, value in stats.items():
                self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._micro_steps += 1
        return losses.total

    def pipeline_auxiliary_loss(self, carry: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Under PP, on the last stage per pipeline micro-batch: the router losses of the whole forward from the
        carry the last stage returned (the engine adds them to the cross-entropy)."""
        return router_losses_from_carry(carry[0], self.args).total

    def step_metrics(self, engine: Engine) -> dict[str, torch.Tensor]:
        """Device tensors (no host sync): "aux_loss" and "z_loss", means over the step's micro-batches and dp ranks;
        "expert_load" [blocks, n_experts] top-k assignments summed over them (int64). Resets the sums."""
        if engine.cfg.pp > 1:
            return self._pipeline_step_metrics(engine)
        if not self._sums:
            return {}
        n = max(self._micro_steps, 1)
        out = {"aux_loss": engine.dp_mean(self._sums["aux_loss"] / n),
               "z_loss": engine.dp_mean(self._sums["z_loss"] / n),
               "expert_load": (engine.dp_mean(self._sums["expert_load"]) * engine.dp_size).round().long()}
        self._sums, self._micro_steps = {}, 0
        return out

    def _pipeline_step_metrics(self, engine: Engine) -> dict[str, torch.Tensor]:
        """The step's metrics from the carries of its pipeline micro-batches (held by the last stage), sent to
        every pp rank, then reduced over dp as without PP."""
        carries = engine.take_pipeline_carries()
        if carries is None:  # no training step since the last call (the same answer on every rank)
            return {}
        n_load = self.args.n_layers * self.args.n_experts
        packed = torch.zeros(2 + n_load, device=engine.device)  # aux mean, z mean, expert load
        if carries:
            losses = [router_losses_from_carry(carry[0].float(), self.args) for carry in carries]
            packed = torch.cat([torch.stack([x.load_balancing for x in losses]).mean().reshape(1),
                                torch.stack([x.z_loss for x in losses]).mean().reshape(1),
                                torch.stack([x.expert_load for x in losses]).sum(dim=0).flatten()])
        packed = engine.from_last_stage(packed)
        load = packed[2:].view(self.args.n_layers, self.args.n_experts)
        return {"aux_loss": engine.dp_mean(packed[0]), "z_loss": engine.dp_mean(packed[1]),
                "expert_load": (engine.dp_mean(load) * engine.dp_size).round().long()}


def build_engine(model_args: ModelArgs, parallel_cfg, precision_cfg, dist_info: DistInfo, seed: int,
                 full_state_dict: dict[str, torch.Tensor] | None = None) -> Engine:
    """The engine for a Mixtral model: the plan, the recipe's compute dtype, the layout."""
    return Engine.build(MixtralPlan(model_args, precision_cfg), parallel_cfg, dist_info, seed=seed,
                        full_state_dict=full_state_dict, dtype=compute_dtype(precision_cfg))
