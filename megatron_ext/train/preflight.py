"""Pre-flight: everything about a training run that can be known before any process, process group or file.

`preflight(cfg, world_size)` is a pure check (it reads, never writes): `hibari train --check`, `hibari launch local
--check` and `hibari launch slurm --dry-run` call it, and `hibari train` calls it before joining the process group.
Each problem is a one-line ConfigError/HibariError naming the field or file (the CLI prints it, exit 2):
- the parallel layout and batch arithmetic (`plan`);
- seq_length divisible by tp under sequence parallelism;
- layer sizes of the layers the precision recipe quantizes (multiples of 16, mxfp8: 32; per TP shard);
- every blend prefix has a .bin/.idx pair that opens, its token ids fit the model vocabulary (`check_vocab_fits` on
  the vocabulary `hibari data tokenize` recorded, else the largest token id when the data is small enough to scan),
  and each split holds at least one sample; the epochs the run will read are reported;
- init.from exists, is a complete hibari checkpoint, and its tensors have the model's shapes (plus optimizer state /
  train state when asked for); an existing run directory has a usable checkpoint of the same architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hibari.errors import ConfigError, HibariError
from megatron_ext.train.config import TrainConfig, check_batch_layout, check_resume_architecture, resolve_model_args

# how Llama's block linears are tensor-parallel (see megatron_ext.models.llama_parallel): the dimension TP shards;
# other linears (e.g. Mixtral's experts) are checked at their full size
_TP_SHARDED = {"attention.wq": "out", "attention.wk": "out", "attention.wv": "out", "feed_forward.w1": "out",
               "feed_forward.w3": "out", "attention.wo": "in", "feed_forward.w2": "in"}
# largest .bin scanned for its maximum token id when the dataset records no vocabulary (--check only)
SCAN_LIMIT_BYTES = 1 << 30


@dataclass
class PreflightResult:
    model_args: object
    layout: object
    grad_accum: int
    notes: list[str] = field(default_factory=list)


def plan(cfg: TrainConfig, world_size: int):
    """The checks that need no data: (model args, resolved parallel layout, grad-accum steps)."""
    from parallel import validate_layout

    model_args = resolve_model_args(cfg)
    if cfg.train.seq_length > model_args.max_seq_len:
        raise ConfigError(f"field train.seq_length: {cfg.train.seq_length} exceeds the model's max_seq_len "
                          f"({model_args.max_seq_len})")
    layout = validate_layout(cfg.parallel, model_args, world_size)
    dp = layout.dp_replicate * layout.dp_shard
    accum = check_batch_layout(cfg, dp)
    if layout.pp > 1 and cfg.train.micro_batch_size % layout.pp_microbatches:
        raise ConfigError(f"field train.micro_batch_size: {cfg.train.micro_batch_size} is not divisible by "
                          f"parallel.pp_microbatches ({layout.pp_microbatches}); the pipeline splits each micro "
                          f"batch into that many pieces")
    return model_args, layout, accum


def preflight(cfg: TrainConfig, world_size: int, scan_tokens: bool = True) -> PreflightResult:
    """All pre-start checks for `cfg` on `world_size` ranks. Raises a one-line HibariError; returns the plan and
    informational notes (one line each) for `--check` to print. scan_tokens: allow reading small .bin files whole
    to find their largest token id."""
    model_args, layout, accum = plan(cfg, world_size)
    result = PreflightResult(model_args, layout, accum)
    check_sequence_parallel(cfg, layout)
    check_precision_backend(cfg, layout)
    check_quantized_sizes(cfg, model_args, layout)
    result.notes += check_data(cfg, model_args.vocab_size, scan_tokens)
    result.notes += check_checkpoints(cfg, model_args)
    return result


def check_sequence_parallel(cfg: TrainConfig, layout) -> None:
    t = cfg.train
    if layout.tp > 1 and layout.sequence_parallel and t.seq_length % layout.tp:
        raise ConfigError(f"field train.seq_length: {t.seq_length} is not divisible by parallel.tp={layout.tp} "
                          f"(sequence parallelism splits the sequence across the TP ranks; change seq_length or set "
                          f"parallel.sequence_parallel: false)")


def check_precision_backend(cfg: TrainConfig, layout) -> None:
    """TransformerEngine's linears keep their own tensor-parallel machinery, which is not wired to hibari's DTensor
    plan: a te.Linear handed a DTensor weight shard would compute on the wrong shapes, so refuse it before start."""
    p = cfg.precision
    if p.quantized and p.backend == "te" and layout.tp > 1:
        raise ConfigError(f"field precision.backend: te is not supported with parallel.tp={layout.tp} "
                          f"(TransformerEngine's tensor parallelism is not wired to hibari's plan); use tp=1 with te, "
                          f"or backend auto|emulated|scaled_mm with tp > 1")


def check_quantized_sizes(cfg: TrainConfig, model_args, layout) -> None:
    """The quantized GEMMs tile every operand in blocks of 16 (mxfp8: 32) along both weight dimensions, on the
    local TP shard; only the blocks the recipe quantizes (not the bf16_first/last_layers) matter."""
    p = cfg.precision
    if not p.quantized:
        return
    from megatron_ext.precision import grouped

    if model_args.arch == "mixtral":  # expert GEMMs are quantized per expert (precision/grouped.py)
        if p.recipe in grouped.EP_UNSUPPORTED_RECIPES and layout.ep > 1:
            raise ConfigError(f"field parallel.ep: {p.recipe} keeps per-expert amax histories that are not sharded "
                              f"with the experts; use parallel.ep=1 with precision.recipe {p.recipe}")
        if p.backend in grouped.UNSUPPORTED_BACKENDS:
            raise ConfigError(f"field precision.backend: {p.backend} swaps nn.Linear modules only, not the grouped "
                              f"expert GEMMs of model.arch mixtral; use auto, emulated or scaled_mm")
    import torch
    from torch import nn

    from megatron_ext.models import build_model
    from megatron_ext.precision import quantized_block_names

    with torch.device("meta"):
        model = build_model(model_args)
    multiple = p.size_multiple
    for block in quantized_block_names(model, p):
        routers = grouped.moe_high_precision_linears(model.get_submodule(block))  # MoE router: not quantized
        for sub, mod in model.get_submodule(block).named_modules():
            if grouped.is_grouped_experts(mod):  # whole experts on every rank (EP shards experts, TP replicates)
                for w, fan_in, fan_out in grouped.expert_sizes(mod):
                    if fan_in % multiple or fan_out % multiple:
                        raise ConfigError(f"field precision.recipe: {p.recipe} quantizes the experts {block}.{sub}."
                                          f"{w}, which are {fan_in}->{fan_out} (model.dim / model.ffn_hidden_dim); "
                                          f"both sizes must be multiples of {multiple}")
            if not isinstance(mod, nn.Linear) or sub in routers:
                continue
            sizes = {"in": mod.in_features, "out": mod.out_features}
            if layout.tp > 1 and sub in _TP_SHARDED:
                sizes[_TP_SHARDED[sub]] //= layout.tp
            if any(v % multiple for v in sizes.values()):
                shard = f" ({sizes['in']}->{sizes['out']} per TP rank)" if layout.tp > 1 else ""
                raise ConfigError(f"field precision.recipe: {p.recipe} quantizes {block}.{sub}, which is "
                                  f"{mod.in_features}->{mod.out_features}{shard}; both sizes must be multiples of "
                                  f"{multiple} (or keep that block in bf16 with precision.bf16_first_layers/"
                                  f"bf16_last_layers)")


def check_data(cfg: TrainConfig, vocab_size: int, scan_tokens: bool = True) -> list[str]:
    d = cfg.data
    if d.type != "indexed":
        return []
    import numpy as np

    from megatron_ext.data import IndexedDataset, check_vocab_fits, normalize_weights, recorded_vocab_size
    from megatron_ext.data import split_document_ranges
    from megatron_ext.data.gpt_dataset import num_epochs_needed

    t = cfg.train
    notes = []
    datasets = []
    for i, (_, prefix) in enumerate(d.blend):
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(f"field data.blend[{i}]: {prefix}{suffix} not found (expected a Megatron "
                                  f"dataset prefix with .bin and .idx, e.g. written by `hibari data tokenize`)")
        datasets.append(IndexedDataset(prefix))  # validates the header and the .bin size
    recorded = recorded_vocab_size([tuple(b) for b in d.blend])
    if recorded is not None:
        check_vocab_fits(recorded, vocab_size)
    for (_, prefix), ds in zip(d.blend, datasets):
        if recorded is None and scan_tokens and 0 < ds.bin_path.stat().st_size <= SCAN_LIMIT_BYTES:
            top = int(np.asarray(ds._bin).max())
            if top >= vocab_size:
                raise HibariError(f"{ds.bin_path}: token id {top} does not fit the model's vocabulary "
                                  f"({vocab_size}); tokenized with a larger tokenizer? (hibari convert expand-vocab)")
    weights = normalize_weights([w for w, _ in d.blend])
    num_train = t.steps * t.global_batch_size
    num_valid = t.eval_batches * t.global_batch_size if t.eval_interval else 0
    for (_, prefix), ds, weight in zip(d.blend, datasets, weights):
        ranges = split_document_ranges(len(ds.document_indices) - 1, tuple(d.split))
        for name, (start, end), samples in (("train", ranges[0], num_train), ("valid", ranges[1], num_valid)):
            if samples == 0 or (name == "valid" and d.split[1] == 0):
                continue
            seqs = slice(int(ds.document_indices[start]), int(ds.document_indices[end])) if end > start else None
            tokens = int(ds.sequence_lengths[seqs].sum(dtype=np.int64)) if seqs else 0
            if tokens < 2:
                raise ConfigError(f"field data.split: the {name} part of {prefix} holds {tokens} tokens "
                                  f"({end - start} documents); it needs at least one sample of "
                                  f"{t.seq_length + 1} tokens")
            need = max(1, int(round(samples * weight)))
            epochs = num_epochs_needed(tokens, t.seq_length, need)
            if name == "train":
                notes.append(f"data {prefix}: {tokens:,} train tokens, the run reads ~{need:,} samples "
                             f"({epochs} epoch{'s' if epochs > 1 else ''})")
    return notes


def check_checkpoints(cfg: TrainConfig, model_args) -> list[str]:
    """The checkpoint the run will start from: the run's own newest usable step (resume) or init.from."""
    from megatron_ext.checkpoint import find_resume_point, read_train_state, verify_checkpoint

    notes = []
    latest, warnings = find_resume_point(Path(cfg.run.dir) / "checkpoints")
    notes += [f"warning: {w}" for w in warnings]
    if latest is not None:
        check_resume_architecture(model_args, latest)
        notes.append(f"resumes from {latest} (step {read_train_state(latest)['step']})")
        return notes
    if cfg.init.from_ is None:
        return notes
    init_dir = Path(cfg.init.from_)
    try:
        metadata = verify_checkpoint(init_dir, training=cfg.init.load_train_state)
    except HibariError as err:
        raise ConfigError(f"field init.from: {err}") from None
    stored = metadata.state_dict_metadata
    for name, shape in expected_model_shapes(model_args).items():
        meta = stored.get(f"model.{name}")
        if meta is None:
            raise ConfigError(f"field init.from: {init_dir} lacks tensor {name!r} of the model")
        if tuple(meta.size) != shape:
            raise ConfigError(f"field init.from: tensor {name!r} of {init_dir} is {list(meta.size)}, the model "
                              f"needs {list(shape)}")
    if cfg.init.load_optimizer and not any(k.startswith("optimizer.") for k in stored):
        raise ConfigError(f"field init.load_optimizer: {init_dir} has no optimizer state (a converted model?); "
                          f"set init.load_optimizer: false")
    notes.append(f"initialises from {init_dir}")
    return notes


def expected_model_shapes(model_args) -> dict[str, tuple[int, ...]]:
    """{hibari parameter name: shape} of the model (built on the meta device: no memory, no init)."""
    import torch

    from megatron_ext.models import build_model

    with torch.device("meta"):
        model = build_model(model_args)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}
