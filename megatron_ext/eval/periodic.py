"""Downstream evaluation inside training (`eval:` section): rank 0 scores the checkpoint just saved.

The saved step is read back into a plain one-device model in `eval.dtype` (whatever the training layout and
precision recipe), so the numbers are those `hibari eval --ckpt RUN/checkpoints/step_N` gives for the same step.
The other ranks wait at a barrier meanwhile: keep the tasks small (`eval.limit`) on large jobs, whose collective
timeout bounds the wait.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from hibari.errors import HibariError

CONFIG_NAMES = ("eval.tasks", "eval.task_dirs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eval_due(eval_cfg, step: int, final_step: int) -> bool:
    """At checkpoint steps that are multiples of eval.interval, and at the final step."""
    return eval_cfg.enabled and (step % eval_cfg.interval == 0 or step == final_step)


def load_step_model(step_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """The weights of a saved step in a plain model on one device (optimizer and recipe state are not read), loaded
    as `hibari eval --ckpt` loads them."""
    from megatron_ext.checkpoint import load_model

    model = load_model(step_dir, dtype)
    try:
        return model.to(device=device)
    except (RuntimeError, AssertionError) as err:
        raise HibariError(f"eval.device {device}: {str(err).splitlines()[0]}") from None


@contextmanager
def _rng_restored():
    """Python, numpy, torch (and CUDA) global RNG states as they were: a run with eval steps draws the same
    numbers as one without, and as one resumed from a checkpoint saved before an eval."""
    import random

    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def evaluate_step(eval_cfg, step_dir: str | Path, run_dir: str | Path, step: int, writer=None) -> dict:
    """Run `eval.tasks` on a saved step; results go to RUN/eval/step_N.json and metrics.jsonl. Returns them."""
    from megatron_ext.eval.harness import build_lm, load_tokenizer, record_run_results, run_tasks

    tokenizer = load_tokenizer(eval_cfg.tokenizer, "eval.tokenizer")
    model = load_step_model(step_dir, DTYPES[eval_cfg.dtype], eval_cfg.device)
    lm = build_lm(model, tokenizer, batch_size=eval_cfg.batch_size)
    with _rng_restored():  # lm-eval seeds the global RNGs: training after the eval must not see that
        results = run_tasks(lm, list(eval_cfg.tasks), task_dirs=eval_cfg.task_dirs,
                            num_fewshot=eval_cfg.num_fewshot, limit=eval_cfg.limit, names=CONFIG_NAMES)
    record_run_results(run_dir, step, results, source=str(step_dir), writer=writer)
    return results


def check_ready(eval_cfg) -> None:
    """Before the first step: the extra is installed, the tokenizer loads and every task name is found, so a bad
    `eval:` section fails at start (one line), not at the first checkpoint hours later."""
    if not eval_cfg.enabled:
        return
    from megatron_ext.eval.harness import load_tokenizer, task_manager

    load_tokenizer(eval_cfg.tokenizer, "eval.tokenizer")
    task_manager(list(eval_cfg.tasks), eval_cfg.task_dirs, CONFIG_NAMES)
