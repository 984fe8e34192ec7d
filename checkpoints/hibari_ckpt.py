"""hibari checkpoints for the conversion tools: write model-only checkpoints, stream tensors.

The format itself (hibari_model.json, key prefixes, the pickle-free DCP storage) and reading a checkpoint back
(`load_model`, `load_model_state`) belong to `megatron_ext.checkpoint`; this module adds what HF conversion and
vocabulary expansion need on top of it: output-directory handling and a streaming writer (one tensor in memory at
a time).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import DefaultSavePlanner

from hibari.errors import HibariError
from hibari.io import staged_dir
from megatron_ext.checkpoint import MODEL_PREFIX, save_model_state, write_model_json
from megatron_ext.models.llama import ModelArgs


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HibariError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HibariError(f"output dir {out}: exists and is not empty (pass --overwrite to replace it)")


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless `overwrite` (then empty it first)."""
    out = Path(out_dir)
    _check_output_dir(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def staged_output_dir(out_dir: str | Path, overwrite: bool):
    """`hibari.io.staged_dir` after refusing a non-empty `out_dir` unless `overwrite`: the output appears whole or
    not at all."""
    out = Path(out_dir)
    _check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HibariError(f"output dir {out}: cannot create ({err.strerror})") from None
    with staged_dir(out) as stage:
        yield stage


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors and reads each tensor only when it is written (streaming conversion)."""

    def __init__(self, loader: Callable[[str], torch.Tensor]):
        super().__init__()
        self._loader = loader
        self._previous: torch.Tensor | None = None

    def lookup_object(self, index):
        # the writer asks for tensors one at a time and never reads a written one again, so the previous tensor's
        # storage is released here: at most one tensor is in memory
        if self._previous is not None:
            try:
                self._previous.untyped_storage().resize_(0)
            except RuntimeError:  # a storage the loader did not allocate (e.g. numpy-backed): dropping it is enough
                pass
        self._previous = self._loader(index.fqn[len(MODEL_PREFIX):])
        return self._previous


def save_model_state_streaming(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                               loader: Callable[[str], torch.Tensor], out_dir: str | Path) -> None:
    """Write tensors given as {name: (shape, dtype)}, calling `loader(name)` for each one as it is written."""
    state = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    save_model_state(state, out_dir, planner=_LazySavePlanner(loader))


def save_hibari(state: dict[str, torch.Tensor], model_json: dict, out_dir: str | Path,
                overwrite: bool = False) -> Path:
    """Write a model-only hibari checkpoint from a state dict and a `hibari_model.json` dict (all or nothing)."""
    args = ModelArgs.model_validate(model_json["model"])
    extra = {k: v for k, v in model_json.items() if k not in ("format", "version", "model", "hf_config")}
    with staged_output_dir(out_dir, overwrite) as stage:
        save_model_state(state, stage)
        write_model_json(stage, args, model_json.get("hf_config"), **extra)
    return Path(out_dir)
