"""Which step directory a run resumes from: the one `latest` names, else the newest undamaged one, with a one-line
warning per damaged one skipped.

A step directory is published (renamed from `.tmp_step_X`) only after every rank has written its part, so a
damaged one was changed afterwards (a deleted or truncated shard, an edited index, a disk error). Resuming skips it
and falls back to the newest complete older step; the damaged directory is replaced when the run saves that step
again. When every step directory is damaged the run stops with one line instead of silently starting over.
"""

from __future__ import annotations

from pathlib import Path

from hibari.errors import HibariError
from hibari.io import read_json_object
from megatron_ext.checkpoint.format import (EXTRA_STATE_DIR, MODEL_JSON, RNG_DIR, TRAIN_STATE, latest_pointer,
                                            list_steps, read_model_json, read_train_state)
from megatron_ext.checkpoint.tensors import read_checked_index


def verify_checkpoint(step_dir: str | Path, training: bool = True):
    """Check a checkpoint is complete (model json, JSON index, every shard at full length, train state); return its
    DCP Metadata. Raises a one-line HibariError naming the damaged file."""
    step_dir = Path(step_dir)
    read_model_json(step_dir)
    metadata = read_checked_index(step_dir)
    if training:
        state = read_train_state(step_dir)
        expected = int(step_dir.name.rsplit("_", 1)[-1]) if step_dir.name[-1:].isdigit() else None
        if expected is not None and state["step"] != expected:
            raise HibariError(f"{step_dir / TRAIN_STATE}: says step {state['step']}, the directory step {expected}")
        for sub, what in ((RNG_DIR, "RNG state"), (EXTRA_STATE_DIR, "optimizer state")):
            for path in sorted((step_dir / sub).glob("rank_*.json")):
                read_json_object(path, what)
    return metadata


def find_resume_point(root: str | Path) -> tuple[Path | None, list[str]]:
    """(the step `latest` names, else the newest undamaged step directory, or None; one-line warnings about the
    damaged ones skipped).

    Raises HibariError when step directories exist but none is usable.
    """
    root = Path(root)
    steps = list_steps(root)
    warnings: list[str] = []
    pointer = latest_pointer(root)
    if pointer is not None and not pointer.exists():
        warnings.append(f"{root / 'latest'} names {pointer.name}, which does not exist")
    if pointer is not None and pointer in steps:  # what `latest` names first (a user may have rolled it back)
        steps.remove(pointer)
        steps.insert(0, pointer)
    errors = []
    for step_dir in steps:
        if not (step_dir / MODEL_JSON).exists() and not any(step_dir.iterdir()):
            continue  # an empty directory (e.g. made by hand): nothing to warn about
        try:
            verify_checkpoint(step_dir)
        except HibariError as err:
            errors.append(str(err))
            continue
        for reason in errors:
            warnings.append(f"skipping a damaged checkpoint: {reason}; resuming from {step_dir.name}")
        return step_dir, warnings
    if errors:
        raise HibariError(f"no usable checkpoint in {root}: {errors[0]} (move {root} away to start the run over)")
    return None, warnings


def find_latest(root: str | Path) -> Path | None:
    """The newest undamaged step directory (None when there is none)."""
    try:
        return find_resume_point(root)[0]
    except HibariError:
        return None
