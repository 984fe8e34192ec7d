"""`train(cfg)`: pre-flight -> join the process group -> Trainer.fit() -> leave the group.

The pieces live in their own modules: preflight.py (checks before anything starts), trainer.py (the Trainer:
setup/resume, train_step, evaluate, save), checkpoint.py (step directories), signals.py (stop signals, parent
death). `world_size_from_env` is here for the launchers; `plan` is in preflight.py.
"""

from __future__ import annotations

import os

from hibari.errors import HibariError
from megatron_ext.train.config import TrainConfig
from megatron_ext.train.preflight import preflight
from megatron_ext.train.trainer import Trainer, TrainingError


def world_size_from_env(env=os.environ) -> int:
    """World size before any process group exists: torchrun's variable, else SLURM's, else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = env.get(name)
        if value:
            if not value.isdigit() or int(value) < 1:
                raise HibariError(f"environment variable {name}={value!r}: expected a positive integer")
            if name == "SLURM_NTASKS" and "SLURM_PROCID" not in env:
                continue
            return int(value)
    return 1


def set_deterministic(enabled: bool) -> None:
    """`train.deterministic`: deterministic kernels or torch's defaults (set both ways: one process may run several
    trainings). An op without a deterministic implementation then raises instead of running nondeterministically.

    CPU training is bitwise reproducible without it; on GPU, atomics-based kernels (index_add / scatter backward,
    some cuBLAS reductions with split-K workspaces, cuDNN autotuning) vary from run to run unless it is set.
    """
    import torch

    if enabled:  # read when the first cuBLAS handle is made: before any CUDA work of the process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def build_engine(model_args, layout, cfg: TrainConfig, info):
    """The parallel engine of this rank for the model and recipe of `cfg`."""
    if model_args.arch == "mixtral":
        from megatron_ext.models.mixtral_parallel import build_engine
    else:
        from megatron_ext.models.llama_parallel import build_engine

    return build_engine(model_args, layout, cfg.precision, info, seed=cfg.train.seed)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training job described by `cfg` in this process (one rank of a launched job).

    Returns a summary on every rank: {"step", "losses": {step: loss}, "val_losses", "resumed_from", "preempted",
    "interrupted", "stopped_at", ...}.
    """
    from megatron_ext.train.signals import die_with_parent

    die_with_parent()
    world = world_size_from_env()
    checked = preflight(cfg, world, scan_tokens=False)  # before any process group or file

    from parallel.dist import destroy, init_distributed

    set_deterministic(cfg.train.deterministic)
    # parallel.timeout_minutes for the collectives; on CUDA also the layout's environment defaults
    info = init_distributed(layout=checked.layout)
    try:
        return Trainer(cfg, checked.model_args, checked.layout, checked.grad_accum, info, build_engine).fit()
    except OSError as err:
        if not err.filename:
            raise
        # the run directory cannot be written (full disk, permissions): the user's to fix, one line
        raise TrainingError(f"{err.filename}: {err.strerror or err}") from None
    finally:
        destroy()
