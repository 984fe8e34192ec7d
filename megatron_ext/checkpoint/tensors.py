"""One-process access to the tensors of a hibari checkpoint (export, inspection, vocabulary expansion): read one
tensor at a time straight from the shards, write a model-only checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from hibari.errors import HibariError
from megatron_ext.checkpoint.format import MODEL_PREFIX
from megatron_ext.checkpoint.storage import tensor_bytes, check_files, read_index, save_state


def read_checked_index(ckpt_dir: str | Path) -> Metadata:
    metadata, files = read_index(ckpt_dir)
    check_files(ckpt_dir, files)
    return metadata


def tensor_metadata(ckpt_dir: str | Path, prefix: str = MODEL_PREFIX,
                    metadata: Metadata | None = None) -> dict[str, TensorStorageMetadata]:
    """{name without prefix: storage metadata (global size, dtype)} for the tensors under `prefix`."""
    metadata = metadata or read_checked_index(ckpt_dir)
    return {k[len(prefix):]: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}


def checkpoint_keys(ckpt_dir: str | Path) -> set[str]:
    return set(read_checked_index(ckpt_dir).state_dict_metadata)


def read_tensor(ckpt_dir: str | Path, fqn: str, metadata: Metadata) -> torch.Tensor:
    """The whole tensor `fqn`, assembled from its stored chunks (raw bytes; nothing is unpickled)."""
    meta = metadata.state_dict_metadata.get(fqn)
    if meta is None:
        raise HibariError(f"{ckpt_dir}: tensor {fqn!r} missing from the checkpoint")
    out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    for chunk in meta.chunks:
        loc = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
        path = Path(ckpt_dir) / loc.relative_path
        whole = (loc.length > 0 and len(meta.chunks) == 1 and tuple(loc.sizes) == tuple(out.shape)
                 and loc.dtype == out.dtype and loc.length == out.numel() * out.element_size())
        # one chunk holding the whole tensor (every one-process checkpoint): read straight into it, no extra copy
        buf = tensor_bytes(out) if whole else bytearray(loc.length)
        with open(path, "rb") as f:  # buffered readinto loops over short reads (> 2 GB tensors)
            f.seek(loc.offset)
            if f.readinto(buf) != loc.length:
                raise HibariError(f"{path}: checkpoint shard truncated (chunk of {fqn!r} at byte {loc.offset})")
        if not loc.length or whole:
            continue
        piece = torch.frombuffer(buf, dtype=loc.dtype).reshape(loc.sizes)
        view = out
        for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
            view = view.narrow(dim, o, s)
        view.copy_(piece)
    return out


def iter_model_tensors(ckpt_dir: str | Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hibari name, tensor) one at a time, so exports never hold the whole model in memory."""
    metadata = read_checked_index(ckpt_dir)
    model = tensor_metadata(ckpt_dir, metadata=metadata)
    for name in names or list(model):
        if name not in model:
            raise HibariError(f"{ckpt_dir}: tensor {name!r} missing from the checkpoint")
        yield name, read_tensor(ckpt_dir, MODEL_PREFIX + name, metadata)


def save_model_state(state: dict[str, torch.Tensor], out_dir: str | Path, planner=None) -> None:
    """Write a hibari-named model state dict as the tensors of a checkpoint (one process)."""
    save_state({"model": state}, out_dir, planner=planner, no_dist=True)
