"""Learning-rate schedules as pure functions of the step.

`step` counts optimizer updates already taken since the schedule started (0 for the first update), so the LR is
a function of the checkpointed step alone: no scheduler object whose state could drift on resume.

- cosine: linear warmup from `warmup_init_lr` to `lr` over `warmup_steps` updates (the first update already uses
  lr * 1/warmup_steps, Megatron style, never 0), then half-cosine to `min_lr` over `decay_steps` (default: the rest of
  the run), then `min_lr`.
- wsd (warmup-stable-decay): warmup, constant `lr`, and a final decay phase of `decay_steps` (default
  `wsd_decay_fraction` x total) to `min_lr`; shapes linear, cosine or 1-sqrt (Hägele et al. 2024).
- constant: warmup, then `lr`.
Continual pretraining re-warms by starting the schedule at step 0 from the loaded weights (see `init`).
"""

from __future__ import annotations

import math

from megatron_ext.train.config import LRConfig


def warmup_lr(step: int, cfg: LRConfig) -> float:
    frac = (step + 1) / cfg.warmup_steps
    return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * frac


def lr_at(step: int, cfg: LRConfig, total_steps: int) -> float:
    """Learning rate for update number `step` (0-based) of a `total_steps` schedule."""
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    if step < cfg.warmup_steps:
        return warmup_lr(step, cfg)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        decay = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / decay, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(int(round(cfg.wsd_decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay, cfg.warmup_steps)
    if step < decay_start:
        return cfg.lr
    # progress reaches 1 at the last update (step total_steps - 1), so the run ends at min_lr
    progress = min((step - decay_start + 1) / decay, 1.0)
    if cfg.wsd_decay_shape == "linear":
        factor = 1.0 - progress
    elif cfg.wsd_decay_shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # 1-sqrt
        factor = 1.0 - math.sqrt(progress)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
