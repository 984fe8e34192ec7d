"""hibari's own checkpoint: a torch.distributed.checkpoint (DCP) directory plus `hibari_model.json`.

Layout of a checkpoint directory:
    hibari_model.json   {"format": "hibari", "version": 1, "model": ModelArgs, "hf_config": {...} | null, ...}
    .metadata, *.distcp DCP files; model tensors are stored under "model.<hibari name>" (training checkpoints
                        add "optimizer.*", "train_state.*" beside them)

DCP stores every tensor with its global shape, so a checkpoint written by any parallel layout loads into any
other (the engine reshards on load), and a one-process tool reads it tensor by tensor.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from hibari.errors import HibariError
from megatron_ext.models.llama import ModelArgs, Transformer, rope_inv_freq

MODEL_JSON = "hibari_model.json"
MODEL_PREFIX = "model."
FORMAT_VERSION = 1


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless `overwrite` (then empty it first)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HibariError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise HibariError(f"output dir {out}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_model_json(out_dir: str | Path, args: ModelArgs, hf_config: dict | None = None, **extra) -> None:
    meta = {"format": "hibari", "version": FORMAT_VERSION, "model": args.model_dump(mode="json"),
            "hf_config": hf_config, **extra}
    Path(out_dir, MODEL_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def read_model_json(ckpt_dir: str | Path) -> tuple[ModelArgs, dict]:
    path = Path(ckpt_dir, MODEL_JSON)
    if not path.is_file():
        raise HibariError(f"{ckpt_dir}: not a hibari checkpoint ({MODEL_JSON} not found)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        args = ModelArgs.model_validate(meta["model"])
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise HibariError(f"{path}: corrupt model description ({type(err).__name__})") from None
    return args, meta


def _silence_no_pg_warning():
    # one-process tools use DCP on purpose without a process group; its warning would only confuse users
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


def tensor_metadata(ckpt_dir: str | Path, prefix: str = MODEL_PREFIX) -> dict[str, TensorStorageMetadata]:
    """{name without prefix: storage metadata (global size, dtype)} for the tensors under `prefix`."""
    try:
        meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    except FileNotFoundError:
        raise HibariError(f"{ckpt_dir}: DCP metadata (.metadata) not found: incomplete or not a checkpoint") from None
    return {k[len(prefix):]: v for k, v in meta.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def save_model_state(state: dict[str, torch.Tensor], out_dir: str | Path) -> None:
    """DCP-save a hibari-named model state dict (one process)."""
    _silence_no_pg_warning()
    dcp.save({"model": state}, checkpoint_id=str(out_dir), no_dist=True)


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors and reads each tensor only when DCP writes it (streaming conversion)."""

    def __init__(self, loader: Callable[[str], torch.Tensor]):
        super().__init__()
        self._loader = loader
        self._previous: torch.Tensor | None = None

    def lookup_object(self, index):
        # DCP's file writer keeps a reference to every tensor it wrote to a file (for its safetensors variant),
        # which would hold the whole model in memory. It asks for tensors one at a time and never reads a written
        # one again, so the previous tensor's storage is released here.
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
        self._previous = self._loader(index.fqn[len(MODEL_PREFIX):])
        return self._previous


def save_model_state_streaming(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                               loader: Callable[[str], torch.Tensor], out_dir: str | Path) -> None:
    """DCP-save tensors given as {name: (shape, dtype)}, calling `loader(name)` for each one as it is written,
    so that only one tensor is in memory at a time."""
    _silence_no_pg_warning()
    state = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    dcp.save({"model": state}, checkpoint_id=str(out_dir), planner=_LazySavePlanner(loader), no_dist=True)


def iter_model_tensors(ckpt_dir: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so exports never hold the whole model in memory."""
    _silence_no_pg_warning()
    meta = tensor_metadata(ckpt_dir)
    for name in names or list(meta):
        if name not in meta:
            raise HibariError(f"{ckpt_dir}: tensor {name!r} missing from the checkpoint")
        m = meta[name]
        t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        dcp.load({MODEL_PREFIX + name: t}, checkpoint_id=str(ckpt_dir), no_dist=True)
        yield name, t


def load_hibari_state(ckpt_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict with hibari names, hibari_model.json contents)."""
    _, meta = read_model_json(ckpt_dir)
    state = {}
    for name, t in iter_model_tensors(ckpt_dir):
        state[name] = t.to(dtype) if dtype is not None else t
    return state, meta


def save_hibari(state: dict[str, torch.Tensor], model_json: dict, out_dir: str | Path,
                overwrite: bool = False) -> Path:
    """Write a model-only hibari checkpoint from a state dict and a `hibari_model.json` dict."""
    args = ModelArgs.model_validate(model_json["model"])
    out = prepare_output_dir(out_dir, overwrite)
    save_model_state(state, out)
    extra = {k: v for k, v in model_json.items() if k not in ("format", "version", "model", "hf_config")}
    write_model_json(out, args, model_json.get("hf_config"), **extra)
    return out


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Transformer:
    """A Transformer holding `state` (built on the meta device so no random init is wasted)."""
    with torch.device("meta"):
        model = Transformer(args)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                                assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        missing = [m for m in missing if m != "output.weight"]
    if missing or unexpected:
        raise HibariError(f"checkpoint does not match its architecture: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.rope_inv_freq = rope_inv_freq(args)
    return model


def load_hibari(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model of a hibari checkpoint on CPU, one process: `model(input_ids)` -> logits [batch, seq, vocab]."""
    args, _ = read_model_json(ckpt_dir)
    state, _ = load_hibari_state(ckpt_dir)
    return build_model(args, state, dtype).eval()
