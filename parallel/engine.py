"""hibari's 3D-parallel engine: one object that owns the (possibly sharded, pipelined) model and runs steps.

The engine is model-agnostic: it receives a `ModelPlan` (parallel/plan.py) and applies the layout from outside,
TorchTitan style, in this order per pipeline stage: tensor/sequence parallel (DTensor, the plan's TP plan) ->
activation checkpointing -> torch.compile -> FSDP2 -> materialise weights. The mesh is
("pp", "dp_replicate", "dp_shard", "tp"); the same code runs on gloo/CPU and NCCL/GPU. Small models start from one
full seeded CPU state dict sliced locally onto every rank, so every layout starts from identical numbers (what the
parity tests rely on).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hibari.errors import HibariError
from parallel.config import ParallelConfig
from parallel.dist import DistInfo
from parallel.grads import clip_grad_norm_, reduce_partial_grads
from parallel.layout import validate_layout
from parallel.parallelize import (apply_activation_checkpointing, apply_compile, apply_fsdp, load_full_state,
                                  strip_wrapper_prefixes, to_plain)
from parallel.pipeline import build_schedule, forward_only, last_stage_owner, local_stage_ids, stage_layer_ids
from parallel.plan import ModelPlan

log = logging.getLogger(__name__)

# models up to this size are initialised as one full CPU model (layout-independent numbers); bigger ones are
# initialised shard by shard (no rank ever holds the whole model)
FULL_INIT_MAX_PARAMS = 2_000_000_000


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 (labels == -100 ignored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


def _add_auxiliary(loss: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """loss + aux; under loss parallel the cross-entropy is a (replicated) DTensor and a plain aux joins it as one."""
    if hasattr(loss, "device_mesh") and not hasattr(aux, "device_mesh"):
        from torch.distributed.tensor import DTensor

        aux = DTensor.from_local(aux, loss.device_mesh, loss.placements, run_check=False)
    return loss + aux


class Engine:
    """Owns the model parts of this rank and runs forward/backward through the configured layout."""

    def __init__(self):  # use Engine.build
        self.model_parts: list[nn.Module] = []
        self.plan: ModelPlan | None = None
        self.mesh = None
        self.device = torch.device("cpu")
        self.dp_rank, self.dp_size, self.pp_rank, self.tp_rank = 0, 1, 0, 0
        self.is_first_stage = self.is_last_stage = True
        self.cfg: ParallelConfig | None = None
        self.dtype = torch.float32
        self.uses_fsdp = False
        self._dp_group = None
        self._pp_group = None
        self._schedule = None
        self._schedule_microbatches = 0  # micro-batches per schedule step of the current schedule
        self._stage_ids: list[int] = []
        self._stages = []
        self._view: nn.Module | None = None
        self._mb_losses: list[torch.Tensor] = []
        # a plan's extra last-stage outputs per pipeline micro-batch (MoE router carries), kept for step metrics
        self._mb_carries: list[tuple[torch.Tensor, ...]] = []
        self._step_carries: list[tuple[torch.Tensor, ...]] = []
        self._carry_runs = 0
        self._loss_factor = 1.0
        self._n_microbatches = 1

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, plan: ModelPlan, parallel_cfg: ParallelConfig, dist_info: DistInfo, seed: int,
              full_state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> "Engine":
        """This rank's part of the model laid out as `parallel_cfg` says.

        dtype: compute dtype (bf16: FSDP's param dtype, or autocast without FSDP, fp32 master weights either way).
        full_state_dict: initial weights (canonical names); default: `plan.full_state_dict(seed)` for models up to
        FULL_INIT_MAX_PARAMS, a per-shard `plan.init_weights` beyond.
        """
        cfg = validate_layout(parallel_cfg, plan.args, dist_info.world_size)
        eng = cls()
        eng.cfg, eng.plan, eng.device, eng.dtype = cfg, plan, dist_info.device, dtype
        if dist_info.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            names = ("pp", "dp_replicate", "dp_shard", "tp")
            eng.mesh = init_device_mesh(dist_info.device.type, (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp),
                                        mesh_dim_names=names)
            eng.pp_rank = eng.mesh.get_local_rank("pp")
            eng.tp_rank = eng.mesh.get_local_rank("tp")
            eng.dp_size = cfg.dp_replicate * cfg.dp_shard
            dp_mesh_2d = eng.mesh["dp_replicate", "dp_shard"]
            dp_flat = dp_mesh_2d._flatten("dp")
            eng.dp_rank = dp_flat.get_local_rank()
            eng._dp_group = dp_flat.get_group()
            eng._pp_group = eng.mesh.get_group("pp")
        else:
            dp_mesh_2d = None

        n_stages = cfg.pp * cfg.pp_stages_per_rank
        stage_ids = local_stage_ids(eng.pp_rank, cfg.pp, cfg.pp_stages_per_rank, cfg.pp_schedule)
        eng.is_first_stage = 0 in stage_ids
        eng.is_last_stage = (n_stages - 1) in stage_ids

        full_state = full_state_dict
        if full_state is None and plan.num_params() <= FULL_INIT_MAX_PARAMS:
            full_state = plan.full_state_dict(seed)

        eng.uses_fsdp = eng.dp_size > 1
        on_gpu = eng.device.type == "cuda"
        if cfg.compile and not on_gpu:
            log.info("parallel.compile: ignored on %s (torch.compile is used on GPU only)", eng.device.type)
        if cfg.cpu_offload and not (on_gpu and eng.uses_fsdp):
            log.info("parallel.cpu_offload: ignored (FSDP2 offload needs a GPU and dp_shard x dp_replicate > 1)")
        for stage in stage_ids:
            model = plan.build_stage(stage_layer_ids(stage, n_stages, plan.args.n_layers),
                                     first=stage == 0, last=stage == n_stages - 1)
            if cfg.tp > 1:
                plan.apply_tensor_parallel(model, eng.mesh["tp"], cfg.sequence_parallel, cfg.loss_parallel)
            ignored = None
            if cfg.ep > 1:  # the plan shards its experts over ep ranks carved from dp_shard; FSDP leaves them alone
                dp_dims = ("dp_replicate", "dp_shard") if cfg.dp_replicate > 1 else ("dp_shard",)  # HSDP: both
                dp_mesh = eng.mesh[dp_dims + ("tp",) if cfg.tp > 1 else dp_dims]
                ignored = plan.apply_expert_parallel(model, dp_mesh, cfg.ep)
            if cfg.activation_checkpoint != "none":
                apply_activation_checkpointing(plan.blocks(model), cfg.activation_checkpoint, cfg.ac_every_n_layers)
            if cfg.compile and on_gpu:
                apply_compile(plan.blocks(model))
            if eng.uses_fsdp:
                apply_fsdp(model, plan.fsdp_units(model),
                           dp_mesh_2d if cfg.dp_replicate > 1 else eng.mesh["dp_shard"], param_dtype=eng.dtype,
                           reduce_dtype=torch.bfloat16 if cfg.fsdp_reduce_dtype == "bf16" else torch.float32,
                           cpu_offload=cfg.cpu_offload and on_gpu,
                           # under PP every microbatch would re-gather the weights; keep them gathered
                           reshard_after_forward=cfg.pp == 1, ignored_params=ignored)
            model.to_empty(device="cpu" if (cfg.cpu_offload and eng.uses_fsdp and on_gpu) else eng.device)
            plan.after_materialize(model)  # before loading: a re-tied model lists a shared weight once
            if full_state is not None:
                load_full_state(model, full_state)
            else:
                with torch.no_grad():
                    plan.init_weights(model)  # per-shard init for big models (layout-dependent numbers)
            plan.after_materialize(model)  # and after: buffers a precision module derives from its weights
            eng.model_parts.append(model)
        eng._view = plan.merged_view(eng.model_parts)
        eng._stage_ids = stage_ids
        if cfg.pp > 1:
            eng._ensure_schedule(cfg.pp_microbatches)
        return eng

    def _ensure_schedule(self, n_microbatches: int) -> None:
        """A schedule running `n_microbatches` per step (rebuilt, stages included, when the count changes)."""
        if self._schedule is not None and self._schedule_microbatches == n_microbatches:
            return
        cfg = self.cfg
        n_stages = cfg.pp * cfg.pp_stages_per_rank
        self._stages, self._schedule = build_schedule(self.model_parts, self._stage_ids, n_stages, self.device,
                                                      self._pp_group, cfg.pp_schedule, n_microbatches,
                                                      self._pp_loss_fn)
        self._schedule_microbatches = n_microbatches

    # ------------------------------------------------------------------------------------------- running
    def _autocast(self):
        # without FSDP there is no param_dtype cast: bf16 runs under autocast with fp32 master weights
        if self.dtype != torch.float32 and not self.uses_fsdp:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _loss_context(self):
        if self.cfg.tp > 1 and self.cfg.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def _check_batch(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2:
            raise HibariError(f"engine: tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if self.cfg.tp > 1 and self.cfg.sequence_parallel and tokens.shape[1] % self.cfg.tp:
            raise HibariError(f"parallel.sequence_parallel: sequence length {tokens.shape[1]} is not divisible by "
                              f"tp={self.cfg.tp}")
        if self.cfg.pp > 1 and tokens.shape[0] % self.cfg.pp_microbatches:
            raise HibariError(f"parallel.pp_microbatches={self.cfg.pp_microbatches}: does not divide the local batch "
                              f"size {tokens.shape[0]} (micro batch size per dp rank)")

    def _pp_loss_fn(self, output, target: torch.Tensor) -> torch.Tensor:
        """Last stage, per pipeline micro-batch. A stage may return (logits, *carry): tensors a plan passes from stage
        to stage (MoE router statistics); `plan.pipeline_auxiliary_loss(carry)` is then added to the cross-entropy
        and the gradient flows back to earlier stages through the carry's."""
        carry = ()
        if isinstance(output, (tuple, list)):
            output, carry = output[0], tuple(output[1:])
        loss = cross_entropy(output, target)
        self._mb_losses.append(to_plain(loss.detach()).float())
        total = loss
        if carry:
            self._mb_carries.append(tuple(c.detach() for c in carry))
            total = _add_auxiliary(loss, self.plan.pipeline_auxiliary_loss(carry))
        return total * (self._loss_factor / self._n_microbatches)

    def _pp_run(self, tokens, labels, document_ids, train: bool, n_microbatches: int) -> torch.Tensor:
        self._mb_losses, self._mb_carries = [], []
        self._n_microbatches = n_microbatches
        kwargs = {} if document_ids is None else {"document_ids": document_ids.to(self.device)}
        args = (tokens.to(self.device),) if self.is_first_stage else ()
        target = labels.to(self.device) if self.is_last_stage else None
        cfg = self.cfg
        with self._loss_context(), self._autocast():
            if train:
                self._ensure_schedule(n_microbatches)
                self._schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                forward_only({stage.stage_index: stage.submod for stage in self._stages}, self.pp_rank, cfg.pp,
                             cfg.pp * cfg.pp_stages_per_rank, cfg.pp_schedule, self._pp_group, self.device,
                             tokens, labels, document_ids, n_microbatches, self._pp_loss_fn)
        if self.is_last_stage:
            # the schedule's first step also calls the loss function on placeholder outputs to infer gradient
            # metadata: the real microbatch losses are the last n_microbatches recorded
            loss = torch.stack(self._mb_losses[-n_microbatches:]).mean().to(self.device)
            if train and self._mb_carries:
                self._step_carries += self._mb_carries[-n_microbatches:]
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self._carry_runs += int(train)
        loss = self.from_last_stage(loss)
        self._mb_losses, self._mb_carries = [], []
        return loss

    def from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as the rank holding the last pipeline stage has it, on every pp rank (same shape and dtype
        everywhere; a collective over the pp group). Identity without PP."""
        if self.cfg.pp == 1:
            return t
        owner = last_stage_owner(self.cfg.pp, self.cfg.pp_stages_per_rank, self.cfg.pp_schedule)
        t = t.contiguous()
        dist.broadcast(t, src=dist.get_global_rank(self._pp_group, owner), group=self._pp_group)
        return t

    def take_pipeline_carries(self) -> list[tuple[torch.Tensor, ...]] | None:
        """The carries (detached) the last stage received for the training pipeline micro-batches since the last
        call, oldest first ([] on ranks without the last stage); None, on every rank, when no training pipeline
        step ran since then. Clears them."""
        carries = self._step_carries if self._carry_runs else None
        self._step_carries, self._carry_runs = [], 0
        return carries

    def forward_backward_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                              before_micro_batch=None) -> torch.Tensor:
        """Forward + backward of one optimizer step's gradient-accumulation micro-batches (tokens, labels,
        document ids or None), gradients averaged over them. Returns the mean loss (0-d fp32, on the device; no
        host sync).

        Under PP the micro-batches are folded into the pipeline's: ONE schedule step of
        len(micro_batches) x pp_microbatches pieces, so the bubble is paid once per optimizer step, not per
        micro-step. Otherwise one forward/backward per micro-batch; FSDP reduce-scatters after each unless
        `parallel.fsdp_no_sync_accumulation` (one reduction per step, unsharded fp32 gradients held meanwhile).

        before_micro_batch(i): called before micro-batch i runs (e.g. to key per-micro-batch state). Under PP the
        schedule interleaves the forwards and backwards of all micro-batches, so it is called once, with i = 0,
        before the schedule step.
        """
        if not micro_batches:
            raise HibariError("engine: forward_backward_step needs at least one micro batch")
        n = len(micro_batches)
        if self.cfg.pp > 1:
            docs = [d for _, _, d in micro_batches]
            if any(d is None for d in docs) and not all(d is None for d in docs):
                raise HibariError("engine: document ids must be given for all micro batches of a step or for none")
            for tokens, _, _ in micro_batches:
                self._check_batch(tokens)
            tokens = torch.cat([t for t, _, _ in micro_batches])
            labels = torch.cat([lab for _, lab, _ in micro_batches])
            self._loss_factor = 1.0
            if before_micro_batch is not None:
                before_micro_batch(0)
            loss = self._pp_run(tokens, labels, None if docs[0] is None else torch.cat(docs), train=True,
                                n_microbatches=n * self.cfg.pp_microbatches)
            reduce_partial_grads(self.parameters())
            return loss
        losses = []
        for i, (tokens, labels, docs) in enumerate(micro_batches):
            if before_micro_batch is not None:
                before_micro_batch(i)
            losses.append(self.forward_backward(tokens, labels, docs, loss_scale=1.0 / n, sync_grads=i == n - 1))
        return losses[0] if n == 1 else torch.stack(losses).mean()

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None,
                         loss_scale: float = 1.0, sync_grads: bool = True) -> torch.Tensor:
        """Mean token CE of this local batch; backward of loss x loss_scale. Returns the unscaled loss (fp32).

        One gradient-accumulation micro-step (prefer `forward_backward_step`, which folds accumulation into the
        pipeline). `sync_grads=False` on all but the last micro-step skips FSDP's reduce-scatter only with
        `parallel.fsdp_no_sync_accumulation`; by default FSDP reduce-scatters every micro-step and accumulates
        sharded gradients (no unsharded fp32 gradient copy).
        """
        self._check_batch(tokens)
        if self.cfg.pp > 1:
            self._loss_factor = loss_scale
            loss = self._pp_run(tokens, labels, document_ids, train=True, n_microbatches=self.cfg.pp_microbatches)
            reduce_partial_grads(self.parameters())
            return loss
        model = self.model_parts[0]
        if self.uses_fsdp:
            model.set_requires_gradient_sync(sync_grads or not self.cfg.fsdp_no_sync_accumulation)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        if document_ids is not None:
            document_ids = document_ids.to(self.device)
        with self._loss_context():
            with self._autocast():
                logits = model(tokens, document_ids=document_ids)
            loss = cross_entropy(logits, labels)
            aux = self._auxiliary_loss()
            ((loss if aux is None else _add_auxiliary(loss, aux)) * loss_scale).backward()
        return to_plain(loss.detach()).float()

    def _auxiliary_loss(self) -> torch.Tensor | None:
        """The plan's extra training loss of the forward just run (MoE router losses), added before backward."""
        fn = getattr(self.plan, "auxiliary_loss", None)
        return fn(self.model_parts[0]) if fn is not None else None

    def model_metrics(self) -> dict:
        """The plan's per-step model statistics (e.g. MoE aux loss, expert load), reduced over dp; {} if none."""
        fn = getattr(self.plan, "step_metrics", None)
        return fn(self) if fn is not None else {}

    @torch.no_grad()
    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token CE without gradients (validation); same return convention as forward_backward."""
        self._check_batch(tokens)
        if self.cfg.pp > 1:
            return self._pp_run(tokens, labels, document_ids, train=False, n_microbatches=self.cfg.pp_microbatches)
        model = self.model_parts[0]
        if document_ids is not None:
            document_ids = document_ids.to(self.device)
        with self._loss_context():
            with self._autocast():
                logits = model(tokens.to(self.device), document_ids=document_ids)
            loss = cross_entropy(logits, labels.to(self.device))
        return to_plain(loss).float()

    @property
    def dp_group(self):
        """The data-parallel process group (dp_replicate x dp_shard flattened); None in a one-process world."""
        return self._dp_group

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over data-parallel ranks (for logging)."""
        if self.dp_size == 1:
            return t
        out = t.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self._dp_group)
        return out / self.dp_size

    def parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for part in self.model_parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(canonical name, parameter) over all local stages (e.g. for weight-decay masks)."""
        for name, p in self._view.named_parameters():
            yield strip_wrapper_prefixes(name), p

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients across dp/tp/pp (0-d fp32 tensor on the device, no host sync); scales
        them to max_norm when above (max_norm > 0)."""
        reduce_partial_grads(self.parameters())
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return clip_grad_norm_(grads, max_norm, self.device, all_reduce=dist.is_initialized() and self.mesh is not None)

    def set_train(self, mode: bool = True) -> None:
        for part in self.model_parts:
            part.train(mode)

    # ------------------------------------------------------------------------------------- state dicts
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self._view)

    def load_model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self._view, state_dict)

    # Flattened optimizer state: keys are per parameter FQN ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr").
    # Unflattened, `param_groups` is one DCP key shared by all ranks, so under PP (where ranks own different
    # parameters) only one rank's list would survive and a PP run could not reload its own optimizer state.
    @classmethod
    def _optim_options(cls):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self._view, optimizer, options=self._optim_options())

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self._view, optimizer, state_dict, options=self._optim_options())
