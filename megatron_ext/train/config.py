"""`hibari train` configuration: one YAML file, sections below, `a.b=value` overrides on the command line.

Sections: run, model, init, train, optim, lr, data, parallel, precision, checkpoint, log, eval. Only pydantic/numpy are
imported here, so `hibari launch` validates a config (and fails with one line naming the field) before any process,
process group or file exists.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, model_validator

from hibari.config import StrictModel
from hibari.errors import ConfigError
from megatron_ext.data import IndexedDataConfig
from megatron_ext.eval.config import EvalConfig
from megatron_ext.models.llama import ModelArgs
from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.train.tracking import WandbConfig
from parallel.config import ParallelConfig


class RunConfig(StrictModel):
    dir: str = Field(description="run directory: metrics.jsonl, loss.png, config.yaml, checkpoints/")


class InitConfig(StrictModel):
    """Where the weights come from when the run directory has no checkpoint yet (a fresh run)."""

    # `init.from` in YAML ("from" is a Python keyword)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              populate_by_name=True, serialize_by_alias=True)

    from_: str | None = Field(default=None, alias="from",
                              description="hibari checkpoint dir (converted HF model or a training step dir)")
    load_optimizer: bool = Field(False, description="also load optimizer state (the checkpoint must have one)")
    load_train_state: bool = Field(False, description="continue the step counter, LR schedule and data position "
                                                      "of a training checkpoint (default: start at step 0, so the "
                                                      "LR re-warms: continual pretraining)")


class TrainSection(StrictModel):
    steps: int = Field(gt=0, description="optimizer steps")
    seed: int = 1234
    global_batch_size: int = Field(gt=0, description="samples per optimizer step = micro x grad_accum x dp")
    micro_batch_size: int = Field(1, gt=0, description="samples per forward/backward per dp rank")
    seq_length: int = Field(gt=0)
    grad_clip: float = Field(1.0, ge=0.0, description="global-norm clip; 0 disables clipping (norm still logged)")
    eval_interval: int = Field(0, ge=0, description="validation every N steps (0: never; also at the last step)")
    eval_batches: int = Field(2, ge=1, description="global batches per validation")
    document_mask: bool = Field(False, description="attend only within a document (needs document ids: indexed)")
    stop_at: int | None = Field(None, gt=0, description="save a checkpoint after this step and exit 0; the LR "
                                                        "schedule and data stay planned for `steps` (Megatron's "
                                                        "exit interval: split a run into jobs)")
    deterministic: bool = Field(False, description="deterministic kernels (torch.use_deterministic_algorithms, "
                                                   "CUBLAS_WORKSPACE_CONFIG, cuDNN): bitwise resume on GPU; "
                                                   "slower. CPU runs are deterministic anyway")

    @model_validator(mode="after")
    def _check_stop_at(self):
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"train.stop_at ({self.stop_at}) exceeds train.steps ({self.steps})")
        return self


class OptimConfig(StrictModel):
    type: Literal["adamw"] = "adamw"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    fused: bool | None = Field(None, description="fused AdamW kernel (default: on GPU yes, on CPU no)")
    decay_embeddings: bool = Field(False, description="apply weight decay to the input embedding table too")


class LRConfig(StrictModel):
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    lr: float = Field(3e-4, gt=0.0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0.0, description="final learning rate of the decay")
    warmup_steps: int = Field(0, ge=0)
    warmup_init_lr: float = Field(0.0, ge=0.0, description="learning rate the warmup starts from")
    decay_steps: int | None = Field(None, ge=1, description="cosine: steps of decay after warmup (default: to "
                                                             "the end); wsd: length of the final decay phase")
    wsd_decay_fraction: float = Field(0.1, gt=0.0, le=1.0, description="wsd: decay phase as a fraction of "
                                                                       "train.steps when decay_steps is unset")
    wsd_decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"

    @model_validator(mode="after")
    def _check(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class SyntheticDataConfig(StrictModel):
    """Seeded random token sequences built from a fixed set of n-grams, so the loss visibly decreases."""

    type: Literal["synthetic"] = "synthetic"
    vocab_size: int | None = Field(None, gt=0, description="default: the model's vocabulary")
    num_ngrams: int = Field(32, ge=1, description="distinct n-grams the samples are made of")
    ngram_length: int = Field(8, ge=1)
    seed: int | None = Field(None, description="default: train.seed")


DataConfig = Annotated[Union[SyntheticDataConfig, IndexedDataConfig], Field(discriminator="type")]


class CheckpointConfig(StrictModel):
    interval: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    keep_last: int = Field(3, ge=1, description="keep the newest K step directories")
    async_save: bool = Field(False, description="dcp.async_save: write in the background while training goes on")
    save_final: bool = True


class LogConfig(StrictModel):
    tensorboard: bool = False
    plot: bool = Field(True, description="loss.png at each checkpoint and at the end")
    progress: bool = True
    wandb: WandbConfig | None = Field(None, description="Weights & Biases: {project, name, mode, entity} "
                                                        "(megatron_ext/train/tracking.py)")
    interval: int = Field(1, ge=1, description="read loss/grad norm and write metrics every N steps; each read is "
                                               "a host sync on GPU, and stop signals are agreed on then too")


class TrainConfig(StrictModel):
    run: RunConfig
    model: ModelArgs | None = Field(None, description="architecture (optional with init.from: read from there)")
    init: InitConfig = InitConfig()
    train: TrainSection
    optim: OptimConfig = OptimConfig()
    lr: LRConfig = LRConfig()
    data: DataConfig = SyntheticDataConfig()
    parallel: ParallelConfig = ParallelConfig()
    precision: PrecisionConfig = PrecisionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.model is None and self.init.from_ is None:
            raise ValueError("expected a model section or init.from (a hibari checkpoint directory)")
        if self.init.load_optimizer and self.init.from_ is None:
            raise ValueError("init.load_optimizer needs init.from")
        if self.model is not None and self.train.seq_length > self.model.max_seq_len:
            raise ValueError(f"train.seq_length ({self.train.seq_length}) exceeds model.max_seq_len "
                             f"({self.model.max_seq_len})")
        if self.train.document_mask and self.data.type != "indexed":
            raise ValueError("train.document_mask needs data.type: indexed (synthetic data has no documents)")
        if getattr(self.data, "valid", None) and not self.train.eval_interval:
            raise ValueError("data.valid needs train.eval_interval > 0 (the sets are evaluated every N steps)")
        if self.eval.enabled and self.checkpoint.interval and self.eval.interval % self.checkpoint.interval:
            raise ValueError(f"eval.interval ({self.eval.interval}) must be a multiple of checkpoint.interval "
                             f"({self.checkpoint.interval}): downstream eval scores saved checkpoints")
        return self


# fields a training run may change relative to its init checkpoint (runtime choices, not the architecture)
RUNTIME_MODEL_FIELDS = ("attn_backend", "max_seq_len", "init_std")


def architecture_difference(ours: ModelArgs, theirs: ModelArgs) -> tuple[str, object, object] | None:
    """(field, our value, their value) of the first architecture field two models differ in, or None
    (RUNTIME_MODEL_FIELDS are not the architecture)."""
    mine, other = ours.model_dump(), theirs.model_dump()
    for key, value in mine.items():
        if key not in RUNTIME_MODEL_FIELDS and other.get(key) != value:
            return key, value, other.get(key)
    return None


def check_resume_architecture(model_args: ModelArgs, ckpt_dir) -> None:
    """The run's model is the one its checkpoint `ckpt_dir` (which it resumes from) was saved with."""
    from megatron_ext.checkpoint.format import read_model_json

    theirs, _ = read_model_json(ckpt_dir)
    diff = architecture_difference(model_args, theirs)
    if diff is not None:
        key, value, their_value = diff
        raise ConfigError(f"field model.{key}: {value!r} differs from the run's checkpoint {ckpt_dir} "
                          f"({their_value!r}); use a new run.dir for a different model")


def resolve_model_args(cfg: TrainConfig) -> ModelArgs:
    """The run's architecture: `model:` or the init checkpoint's; with both, they must agree on the shapes."""
    if cfg.init.from_ is None:
        return cfg.model
    from pathlib import Path

    from megatron_ext.checkpoint.format import MODEL_JSON, read_model_json

    if not (Path(cfg.init.from_) / MODEL_JSON).is_file():
        raise ConfigError(f"field init.from: {cfg.init.from_} is not a hibari checkpoint ({MODEL_JSON} not found; "
                          f"convert a Hugging Face model with `hibari convert hf-to-hibari`)")
    ckpt_args, _ = read_model_json(cfg.init.from_)
    if cfg.model is None:
        return ckpt_args
    diff = architecture_difference(cfg.model, ckpt_args)
    if diff is not None:
        key, value, their_value = diff
        raise ConfigError(f"field model.{key}: {value!r} differs from init.from checkpoint "
                          f"({their_value!r} in {cfg.init.from_}/hibari_model.json)")
    return cfg.model


def check_batch_layout(cfg: TrainConfig, dp_size: int) -> int:
    """Gradient-accumulation steps for `dp_size` ranks; one-line error when the batch does not divide."""
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"field train.global_batch_size: {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp_size})")
    return t.global_batch_size // per_step
