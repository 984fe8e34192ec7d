"""The Llama/Mistral parallel plan: how `parallel.Engine` lays this model out (TorchTitan's
`models/llama/infra/parallelize.py`).

- pipeline: a stage is the Transformer with only its blocks kept (embedding on the first, norm + head on the last);
  a quantized precision recipe is applied to the whole model before the split, so "first/last N blocks stay in
  BF16" means the model's first/last blocks, not every stage's;
- tensor parallel (Megatron-style on DTensor): q/k/v and w1/w3 column-wise, wo and w2 row-wise, vocab-sharded
  embedding and head, sequence-parallel norms;
- FSDP2 units: each block, the embedding and the head (kept gathered), the stage root owning the norms.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_ext.models.llama import ModelArgs, Transformer, rope_inv_freq
from parallel import Engine
from parallel.dist import DistInfo
from parallel.parallelize import replicate_module


# Linears of a block that read the same input: a quantized recipe runs each group as one fused GEMM group
# (TransformerEngine's fused QKV / fc1; `megatron_ext/precision/fusion.py`). The model still calls them one by one.
LINEAR_GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w1", "feed_forward.w3"))


def compute_dtype(precision_cfg) -> torch.dtype:
    """fp32 when no precision is configured or the recipe is fp32; bf16 for bf16 and the quantized recipes."""
    if precision_cfg is None or getattr(precision_cfg, "recipe", "fp32") == "fp32":
        return torch.float32
    return torch.bfloat16


class LlamaPlan:
    """`parallel.plan.ModelPlan` for `megatron_ext.models.llama.Transformer`."""

    model_class = Transformer  # a subclass plan (Mixtral) builds its own model through the same stage split

    def __init__(self, args: ModelArgs, precision_cfg=None):
        self.args = args
        self.precision_cfg = precision_cfg

    def num_params(self) -> int:
        return self.args.num_params()

    def full_state_dict(self, seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model_class(self.args).state_dict()

    def build_stage(self, layer_ids: list[int], first: bool, last: bool) -> Transformer:
        with torch.device("meta"):
            model = self.model_class(self.args)
        if self.precision_cfg is not None and getattr(self.precision_cfg, "quantized", False):
            self.apply_precision(model)
        keep = {str(i) for i in layer_ids}
        for key in list(model.layers.keys()):
            if key not in keep:
                del model.layers[key]
        if not first:
            model.tok_embeddings = None
        if not last:
            model.norm = None
            model.output = None
        return model

    def apply_precision(self, model: nn.Module) -> nn.Module:
        """The quantized recipe on the whole model, same-input linears fused (`LINEAR_GROUPS`); the trainer (via
        `build_stage`) and `bench/precision_ops.py` both go through here."""
        from megatron_ext.precision import apply_precision  # noqa: PLC0415

        return apply_precision(model, self.precision_cfg, linear_groups=LINEAR_GROUPS)

    def blocks(self, stage: Transformer) -> nn.ModuleDict:
        return stage.layers

    def apply_tensor_parallel(self, stage: Transformer, tp_mesh, sequence_parallel: bool,
                              loss_parallel: bool) -> None:
        apply_tensor_parallel(stage, tp_mesh, sequence_parallel, loss_parallel)

    def fsdp_units(self, stage: Transformer) -> list[tuple[nn.Module, bool | None]]:
        tied = self.args.tie_embeddings  # a tied weight belongs to the root unit (one module owns it)
        units: list[tuple[nn.Module, bool | None]] = []
        if stage.tok_embeddings is not None and not tied:
            units.append((stage.tok_embeddings, None))
        units += [(block, None) for block in stage.layers.values()]
        if stage.output is not None and not tied:
            # the head is used right after the last block's forward and first in backward: keep it gathered
            units.append((stage.output, False))
        return units

    def after_materialize(self, stage: Transformer) -> None:
        # `to_empty` gives each module its own copy of a shared meta parameter: tie the head to the embedding again
        if self.args.tie_embeddings and stage.output is not None and stage.tok_embeddings is not None:
            if stage.output.weight is not stage.tok_embeddings.weight:
                stage.output.weight = stage.tok_embeddings.weight
        with torch.no_grad():
            stage.rope_inv_freq.copy_(rope_inv_freq(self.args).to(stage.rope_inv_freq.device))
        for module in stage.modules():  # modules swapped in by the precision recipe may carry their own state
            init = getattr(module, "init_buffers", None)
            if callable(init):
                init()

    def init_weights(self, stage: Transformer) -> None:
        stage.init_weights()

    def merged_view(self, parts: list[nn.Module]) -> nn.Module:
        return _StagesView(parts)


class _StagesView(nn.Module):
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


def apply_tensor_parallel(model: Transformer, tp_mesh, sequence_parallel: bool, loss_parallel: bool,
                          dense_mlp: bool = True) -> None:
    """Megatron-style TP on DTensor: q/k/v and w1/w3 column-wise, wo and w2 row-wise, vocab-sharded embedding/head.
    `dense_mlp=False` leaves each block's `feed_forward` to the caller (Mixtral's MoE: mixtral_parallel.py).

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
        replicate_module(model.norm, tp_mesh)
    if model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight  # both Shard(0) on the vocab dim: one DTensor serves both

    for block in model.layers.values():
        bplan = {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream, use_local_output=not sp),
        }
        if dense_mlp:
            bplan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                          "feed_forward.w2": RowwiseParallel(output_layouts=stream, use_local_output=not sp)})
        if sp:
            bplan["attention_norm"] = SequenceParallel()
            bplan["ffn_norm"] = SequenceParallel()
            bplan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                    desired_input_layouts=(Replicate(), None, None, None))
            if dense_mlp:
                bplan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, bplan)
        if not sp:
            replicate_module(block.attention_norm, tp_mesh)
            replicate_module(block.ffn_norm, tp_mesh)

    # pipeline stages exchange plain local tensors: [b, s/tp, dim] under sequence parallel
    if sp and (model.tok_embeddings is None or model.output is None):
        first, last = model.tok_embeddings is not None, model.output is not None
        # plain tensors a stage passes along with its hidden state (Mixtral's router carry) stay as they are
        hidden = (Shard(1),) + ((None,) if getattr(model, "pipeline_carry", False) else ())
        if not first and not last:
            style = PrepareModuleInputOutput(input_layouts=hidden, desired_input_layouts=hidden,
                                             use_local_input=False, output_layouts=hidden,
                                             desired_output_layouts=hidden, use_local_output=True)
        elif not first:
            style = PrepareModuleInput(input_layouts=hidden, desired_input_layouts=hidden, use_local_output=False)
        else:
            style = PrepareModuleOutput(output_layouts=hidden, desired_output_layouts=hidden, use_local_output=True)
        parallelize_module(model, tp_mesh, style)


def build_engine(model_args: ModelArgs, parallel_cfg, precision_cfg, dist_info: DistInfo, seed: int,
                 full_state_dict: dict[str, torch.Tensor] | None = None) -> Engine:
    """The engine for a Llama/Mistral model: the plan, the recipe's compute dtype, the layout."""
    return Engine.build(LlamaPlan(model_args, precision_cfg), parallel_cfg, dist_info, seed=seed,
                        full_state_dict=full_state_dict, dtype=compute_dtype(precision_cfg))
