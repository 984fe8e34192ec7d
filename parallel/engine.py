"""hibari's 3D-parallel engine: one object that owns the (possibly sharded, pipelined) model and runs steps.

Layouts are applied to the plain `Transformer` from outside, TorchTitan style, in this order per pipeline stage:
precision swap -> tensor/sequence parallel (DTensor) -> activation checkpointing -> torch.compile -> FSDP2 ->
materialise weights. The mesh is ("pp", "dp_replicate", "dp_shard", "tp"); the same code runs on gloo/CPU and
NCCL/GPU. Weights start from one full CPU state dict (seeded), sliced locally onto every rank, so every layout
starts from identical numbers (what the parity tests rely on).
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
from megatron_ext.models.llama import ModelArgs, Transformer, rope_inv_freq
from parallel.config import ParallelConfig
from parallel.dist import DistInfo
from parallel.layout import validate_layout

log = logging.getLogger(__name__)

_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16]  # activations crossing pipeline stages
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
# models up to this size are initialised as one full CPU model (layout-independent numbers); bigger ones are
# initialised shard by shard (no rank ever holds the whole model)
FULL_INIT_MAX_PARAMS = 2_000_000_000


# ----------------------------------------------------------------------------------------------- pure helpers

def stage_layer_ids(stage: int, n_stages: int, n_layers: int) -> list[int]:
    """Layers of pipeline stage `stage` (even split; validate_layout guarantees divisibility)."""
    per = n_layers // n_stages
    return list(range(stage * per, (stage + 1) * per))


def local_stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Stage indices held by a pp rank: loop order (r, r+pp, ...) or V order (r, 2pp-1-r) for ZBV."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def last_stage_owner(pp: int, schedule: str) -> int:
    """pp rank holding the last stage (where the loss is computed)."""
    return 0 if schedule == "zbv" else pp - 1


def compute_dtype(precision_cfg) -> torch.dtype:
    """fp32 when no precision is configured or the recipe is fp32; bf16 for bf16 and the quantized recipes."""
    if precision_cfg is None or getattr(precision_cfg, "recipe", "fp32") == "fp32":
        return torch.float32
    return torch.bfloat16


def strip_wrapper_prefixes(name: str) -> str:
    return name.replace(CHECKPOINT_PREFIX, "").replace("_orig_mod.", "")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 (labels == -100 ignored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


def _plain(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ------------------------------------------------------------------------------------------- model building

def build_stage_model(args: ModelArgs, stage: int, n_stages: int, precision_cfg=None) -> Transformer:
    """A Transformer on the meta device holding only the blocks (and embedding/head) of one pipeline stage.

    A quantized precision recipe is applied to the whole model before the split, so "first/last N blocks stay
    in BF16" means the model's first/last blocks, not every stage's.
    """
    with torch.device("meta"):
        model = Transformer(args)
    if precision_cfg is not None and getattr(precision_cfg, "quantized", False):
        from megatron_ext.precision import apply_precision  # noqa: PLC0415

        apply_precision(model, precision_cfg)
    if n_stages == 1:
        return model
    keep = {str(i) for i in stage_layer_ids(stage, n_stages, args.n_layers)}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage != 0:
        model.tok_embeddings = None
    if stage != n_stages - 1:
        model.norm = None
        model.output = None
    return model


def _replicate_module(module: nn.Module, tp_mesh) -> None:
    """Parameters -> Replicate DTensors (so every parameter is a DTensor); activations stay plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def input_fn(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def output_fn(mod, outputs, mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    distribute_module(module, tp_mesh, input_fn=input_fn, output_fn=output_fn)


def apply_tensor_parallel(model: Transformer, tp_mesh, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Megatron-style TP on DTensor: q/k/v and w1/w3 column-wise, wo and w2 row-wise, vocab-sharded embedding/head.

    With sequence parallel the residual stream is a DTensor sharded on the sequence dim, so the model's top-level
    forward still sees the global sequence length (RoPE tables and masks are built for the full sequence); each
    block all-gathers before attention / MLP and reduce-scatters after (2 + 2 collectives per block forward).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   PrepareModuleOutput, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                 use_local_output=not sp)
    if model.norm is not None and sp:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=stream,
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if model.norm is not None and not sp:
        _replicate_module(model.norm, tp_mesh)
    if model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight  # both Shard(0) on the vocab dim: one DTensor serves both

    for block in model.layers.values():
        bplan = {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream, use_local_output=not sp),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream, use_local_output=not sp),
        }
        if sp:
            bplan["attention_norm"] = SequenceParallel()
            bplan["ffn_norm"] = SequenceParallel()
            bplan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                    desired_input_layouts=(Replicate(), None, None, None))
            bplan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, bplan)
        if not sp:
            _replicate_module(block.attention_norm, tp_mesh)
            _replicate_module(block.ffn_norm, tp_mesh)

    # pipeline stages exchange plain local tensors: [b, s/tp, dim] under sequence parallel
    if sp and (model.tok_embeddings is None or model.output is None):
        first, last = model.tok_embeddings is not None, model.output is not None
        if not first and not last:
            style = PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                             use_local_input=False, output_layouts=(Shard(1),),
                                             desired_output_layouts=(Shard(1),), use_local_output=True)
        elif not first:
            style = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                       use_local_output=False)
        else:
            style = PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
                                        use_local_output=True)
        parallelize_module(model, tp_mesh, style)


def apply_activation_checkpointing(model: Transformer, mode: str, every_n: int) -> None:
    """full: every block recomputed in backward; selective: every `every_n`-th block."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.layers.items()):
        if mode == "full" or (mode == "selective" and int(key) % every_n == 0):
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """Compile each block in place (FQNs unchanged, so checkpoints stay layout-independent)."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def apply_fsdp(model: Transformer, dp_mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               cpu_offload: bool, reshard_after_forward: bool) -> None:
    """FSDP2 per block, embedding and head as their own units, the root owning the rest (norms)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = {"mesh": dp_mesh, "mp_policy": mp}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    tied = model.args.tie_embeddings
    if model.tok_embeddings is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kw)
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    if model.output is not None and not tied:
        # the head is used right after the last block's forward and first in backward: keep it gathered
        fully_shard(model.output, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


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


def _retie_embeddings(model: Transformer) -> None:
    """`to_empty` gives each module its own copy of a shared meta parameter: tie the head to the embedding again."""
    if model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        if model.output.weight is not model.tok_embeddings.weight:
            model.output.weight = model.tok_embeddings.weight


def _init_buffers(model: Transformer, args: ModelArgs) -> None:
    with torch.no_grad():
        model.rope_inv_freq.copy_(rope_inv_freq(args).to(model.rope_inv_freq.device))
    for module in model.modules():  # modules swapped in by the precision recipe may carry their own state
        init = getattr(module, "init_buffers", None)
        if callable(init):
            init()


class _ModelView(nn.Module):
    """The local stages as one module with hibari FQNs (`layers.<global id>...`), for DCP state dicts."""

    def __init__(self, parts: list[Transformer]):
        super().__init__()
        for part in parts:  # registration order = hibari order: embedding, blocks by id, norm, head
            if part.tok_embeddings is not None:
                self.tok_embeddings = part.tok_embeddings
        blocks = {key: block for part in parts for key, block in part.layers.items()}
        self.layers = nn.ModuleDict({key: blocks[key] for key in sorted(blocks, key=int)})
        for part in parts:
            if part.norm is not None:
                self.norm = part.norm
            if part.output is not None:
                self.output = part.output


# -------------------------------------------------------------------------------------------------- engine

class Engine:
    """Owns the model parts of this rank and runs forward/backward through the configured layout."""

    def __init__(self):  # use Engine.build
        self.model_parts: list[nn.Module] = []
        self.mesh = None
        self.device = torch.device("cpu")
        self.dp_rank, self.dp_size, self.pp_rank, self.tp_rank = 0, 1, 0, 0
        self.is_first_stage = self.is_last_stage = True
        self.cfg: ParallelConfig | None = None
        self.model_args: ModelArgs | None = None
        self.dtype = torch.float32
        self.uses_fsdp = False
        self._dp_group = None
        self._pp_group = None
        self._schedule = None
        self._stages = []
        self._view: nn.Module | None = None
        self._mb_losses: list[torch.Tensor] = []
        self._loss_factor = 1.0

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model_args: ModelArgs, parallel_cfg: ParallelConfig, precision_cfg, dist_info: DistInfo,
              seed: int, full_state_dict: dict[str, torch.Tensor] | None = None) -> "Engine":
        cfg = validate_layout(parallel_cfg, model_args, dist_info.world_size)
        eng = cls()
        eng.cfg, eng.model_args, eng.device = cfg, model_args, dist_info.device
        eng.dtype = compute_dtype(precision_cfg)
        world = dist_info.world_size
        if world > 1:
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
        stage_ids = local_stage_ids(eng.pp_rank, cfg.pp, cfg.pp_stages_per_rank, cfg.pp_schedule) \
            if cfg.pp > 1 else [0]
        eng.is_first_stage = 0 in stage_ids
        eng.is_last_stage = (n_stages - 1) in stage_ids

        full_state = full_state_dict
        if full_state is None and model_args.num_params() <= FULL_INIT_MAX_PARAMS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                full_state = Transformer(model_args).state_dict()

        eng.uses_fsdp = eng.dp_size > 1
        on_gpu = eng.device.type == "cuda"
        if cfg.compile and not on_gpu:
            log.info("parallel.compile: ignored on %s (torch.compile is used on GPU only)", eng.device.type)
        if cfg.cpu_offload and not (on_gpu and eng.uses_fsdp):
            log.info("parallel.cpu_offload: ignored (FSDP2 offload needs a GPU and dp_shard x dp_replicate > 1)")
        for stage in stage_ids:
            model = build_stage_model(model_args, stage, n_stages, precision_cfg)
            if cfg.tp > 1:
                apply_tensor_parallel(model, eng.mesh["tp"], cfg.sequence_parallel, cfg.loss_parallel)
            if cfg.activation_checkpoint != "none":
                apply_activation_checkpointing(model, cfg.activation_checkpoint, cfg.ac_every_n_layers)
            if cfg.compile and on_gpu:
                apply_compile(model)
            if eng.uses_fsdp:
                dp_mesh = dp_mesh_2d if cfg.dp_replicate > 1 else eng.mesh["dp_shard"]
                apply_fsdp(model, dp_mesh, param_dtype=eng.dtype,
                           reduce_dtype=torch.bfloat16 if cfg.fsdp_reduce_dtype == "bf16" else torch.float32,
                           cpu_offload=cfg.cpu_offload and on_gpu,
                           # under PP every microbatch would re-gather the weights; keep them gathered
                           reshard_after_forward=cfg.pp == 1)
            model.to_empty(device="cpu" if (cfg.cpu_offload and eng.uses_fsdp and on_gpu) else eng.device)
            _retie_embeddings(model)
            if full_state is not None:
                load_full_state(model, full_state)
            else:
                with torch.no_grad():
                    model.init_weights()  # per-shard init for big models (layout-dependent numbers)
            _init_buffers(model, model_args)
            eng.model_parts.append(model)
        eng._view = _ModelView(eng.model_parts)
        if cfg.pp > 1:
            eng._build_schedule(stage_ids, n_stages)
        return eng

    def _build_schedule(self, stage_ids: list[int], n_stages: int) -> None:
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                                  ScheduleZBVZeroBubble)

        self._stages = [PipelineStage(part, stage, n_stages, self.device, group=self._pp_group)
                        for part, stage in zip(self.model_parts, stage_ids)]
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
                 "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}
        kind = kinds[self.cfg.pp_schedule]
        stages = self._stages[0] if self.cfg.pp_schedule in ("gpipe", "1f1b") else self._stages
        # scale_grads=False: the loss function already divides by the number of microbatches, so gradients
        # accumulated over several forward_backward calls (gradient accumulation) are never rescaled
        self._schedule = kind(stages, self.cfg.pp_microbatches, loss_fn=self._pp_loss_fn, scale_grads=False)

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

    def _pp_loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(output, target)
        self._mb_losses.append(_plain(loss.detach()).float())
        return loss * (self._loss_factor / self.cfg.pp_microbatches)

    def _pp_run(self, tokens, labels, document_ids, train: bool) -> torch.Tensor:
        self._mb_losses = []
        kwargs = {} if document_ids is None else {"document_ids": document_ids.to(self.device)}
        args = (tokens.to(self.device),) if self.is_first_stage else ()
        target = labels.to(self.device) if self.is_last_stage else None
        with self._loss_context(), self._autocast():
            if train:
                self._schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                self._pp_forward_only(tokens, labels, document_ids)
        if self.is_last_stage:
            # the schedule's first step also calls the loss function on placeholder outputs to infer gradient
            # metadata: the real microbatch losses are the last n_microbatches recorded
            loss = torch.stack(self._mb_losses[-self.cfg.pp_microbatches:]).mean().to(self.device)
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        owner = last_stage_owner(self.cfg.pp, self.cfg.pp_schedule)
        dist.broadcast(loss, src=dist.get_global_rank(self._pp_group, owner), group=self._pp_group)
        self._mb_losses = []
        return loss

    def _stage_owner(self, stage: int) -> int:
        pp = self.cfg.pp
        if self.cfg.pp_schedule == "zbv":
            return stage if stage < pp else 2 * pp - 1 - stage
        return stage % pp

    def _pp_forward_only(self, tokens, labels, document_ids) -> None:
        """Validation through the pipeline: microbatches pass stage by stage with plain P2P sends.

        The schedules' own eval() runs backward actions on the zero-bubble runtimes; forward-only needs no
        schedule, only the stage order (works for loop and V placements alike).
        """
        n_mb, n_stages = self.cfg.pp_microbatches, self.cfg.pp * self.cfg.pp_stages_per_rank
        parts = {stage.stage_index: stage.submod for stage in self._stages}
        tok_mbs, lab_mbs = tokens.tensor_split(n_mb), labels.tensor_split(n_mb)
        doc_mbs = [None] * n_mb if document_ids is None else document_ids.tensor_split(n_mb)
        peer = lambda pp_rank: dist.get_global_rank(self._pp_group, pp_rank)  # noqa: E731
        for m in range(n_mb):
            doc = None if doc_mbs[m] is None else doc_mbs[m].to(self.device)
            hidden = None
            for s in range(n_stages):
                owner = self._stage_owner(s)
                nxt = self._stage_owner(s + 1) if s + 1 < n_stages else None
                if owner == self.pp_rank:
                    x = tok_mbs[m].to(self.device) if s == 0 else hidden
                    out = parts[s](x, document_ids=doc)
                    if s == n_stages - 1:
                        self._pp_loss_fn(out, lab_mbs[m].to(self.device))
                    elif nxt == self.pp_rank:
                        hidden = out
                    else:
                        out = out.contiguous()
                        header = torch.tensor([*out.shape, _DTYPE_CODES.index(out.dtype)], dtype=torch.int64,
                                              device=self.device)
                        dist.send(header, peer(nxt), group=self._pp_group)
                        dist.send(out, peer(nxt), group=self._pp_group)
                elif nxt == self.pp_rank:
                    header = torch.empty(4, dtype=torch.int64, device=self.device)
                    dist.recv(header, peer(owner), group=self._pp_group)
                    *shape, code = header.tolist()
                    hidden = torch.empty(shape, dtype=_DTYPE_CODES[code], device=self.device)
                    dist.recv(hidden, peer(owner), group=self._pp_group)

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None,
                         loss_scale: float = 1.0, sync_grads: bool = True) -> torch.Tensor:
        """Mean token CE of this local batch; backward of loss x loss_scale. Returns the unscaled loss (fp32).

        `sync_grads=False` on all but the last gradient-accumulation micro-step lets FSDP keep accumulating
        unsharded local gradients instead of reduce-scattering after every micro-step (one reduction per
        optimizer step, as Megatron's and TorchTitan's loops do). The pipeline schedule manages this itself.
        """
        self._check_batch(tokens)
        if self.cfg.pp > 1:
            self._loss_factor = loss_scale
            loss = self._pp_run(tokens, labels, document_ids, train=True)
            self._finalize_grads()
            return loss
        model = self.model_parts[0]
        if self.uses_fsdp:
            model.set_requires_gradient_sync(sync_grads)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        if document_ids is not None:
            document_ids = document_ids.to(self.device)
        with self._loss_context():
            with self._autocast():
                logits = model(tokens, document_ids=document_ids)
            loss = cross_entropy(logits, labels)
            (loss * loss_scale).backward()
        return _plain(loss.detach()).float()

    @torch.no_grad()
    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token CE without gradients (validation); same return convention as forward_backward."""
        self._check_batch(tokens)
        if self.cfg.pp > 1:
            return self._pp_run(tokens, labels, document_ids, train=False)
        model = self.model_parts[0]
        if document_ids is not None:
            document_ids = document_ids.to(self.device)
        with self._loss_context():
            with self._autocast():
                logits = model(tokens.to(self.device), document_ids=document_ids)
            loss = cross_entropy(logits, labels.to(self.device))
        return _plain(loss).float()

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
        """(hibari name, parameter) over all local stages (e.g. for weight-decay masks)."""
        for name, p in self._view.named_parameters():
            yield strip_wrapper_prefixes(name), p

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of all gradients across dp/tp/pp; scales them to max_norm when above (max_norm > 0).

        Each rank sums the squares of its local gradient shards, counting a shard replicated over k ranks as 1/k,
        and one all-reduce over the world adds everything up (dp, tp and pp at once).
        """
        from torch.distributed.tensor import DTensor

        locals_, weights = [], []
        self._finalize_grads()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
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
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        if locals_:
            norms = torch.stack([n.float().to(self.device) for n in torch._foreach_norm(locals_, 2.0)])
            sq = (norms.square() * torch.tensor(weights, device=self.device)).sum()
        if dist.is_initialized() and self.mesh is not None:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        total_f = float(sq) ** 0.5
        if max_norm > 0 and grads:
            coef = max_norm / (total_f + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(locals_, coef)
        return total_f

    @torch.no_grad()
    def _finalize_grads(self) -> None:
        """Reduce gradients left as pending sums (Partial DTensors) to their parameter's placements.

        The pipeline stages' backward leaves the gradients of sequence-parallel norm weights as Partial; the
        optimizer and clipping need them reduced (TP-only backward reduces them itself).
        """
        from torch.distributed.tensor import DTensor

        for p in self.parameters():
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                p.grad = g.redistribute(g.device_mesh, p.placements)

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

