"""DCP storage without pickle: raw tensor bytes + a JSON index, so loading a checkpoint never executes a file.

torch.distributed.checkpoint's own FileSystemWriter stores its index (`.metadata`) as a pickle and each tensor as a
`torch.save` blob, and its default load planner unpickles non-tensor values without `weights_only`: a crafted
checkpoint would run code on load. hibari keeps DCP's planning (global shapes, any layout reloads any other) and
replaces the storage layer:
- `JsonWriter` writes each rank's tensor chunks as raw bytes into `__<rank>_0.distcp` and the coordinator writes the
  index as `dcp_metadata.json` (no `.metadata` pickle is written);
- `JsonReader` builds DCP's Metadata from that JSON and copies raw bytes into the destination tensors;
- only tensors go through DCP: non-tensor leaves (optimizer hyper-parameters) are split off by `split_state` and
  stored as JSON by the caller; `SafeLoadPlanner` refuses any non-tensor item.
A directory without `dcp_metadata.json` (e.g. written by an older hibari or by plain DCP) is refused, one line.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from hibari.errors import HibariError
from megatron_ext.checkpoint.format import DCP_METADATA_JSON

STORAGE_FORMAT = "hibari-dcp-json"
STORAGE_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def silence_no_pg_warning() -> None:
    # one-process tools use DCP on purpose without a process group; its warning would only confuse users
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


@dataclass(frozen=True)
class ChunkLocation:
    """Where one stored chunk lives: file (relative), byte range, and its shape/dtype to rebuild it."""

    relative_path: str
    offset: int
    length: int
    sizes: tuple[int, ...]
    dtype: torch.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise HibariError(f"checkpoint: tensors of dtype {name} cannot be stored")
    return name


# ------------------------------------------------------------------------------------------------------ writing
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer, without a copy. Not via .numpy(): that marks the
    storage non-resizable for good, and the streaming converter frees each tensor (resize_(0)) once written.
    The view is only valid while `t` is alive: use it at once."""
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class JsonWriter(FileSystemWriter):
    """DCP StorageWriter: raw chunk bytes per rank, JSON index by the coordinator. Keeps FileSystemWriter's
    directory handling, per-rank file prefixes and async staging."""

    def __init__(self, path: str | os.PathLike, sync_files: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=sync_files, thread_count=1, overwrite=True)

    def write_data(self, plan, planner) -> torch.futures.Future:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        path = Path(self.path) / file_name
        try:
            results = self._write_items(path, file_name, plan, planner)
        except OSError as err:  # name the shard: "…/__0_0.distcp: No space left on device"
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        fut = torch.futures.Future()
        fut.set_result(results)
        return fut

    def _write_items(self, path: Path, file_name: str, plan, planner) -> list:
        results = []
        with open(path, "wb") as f:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise HibariError(f"checkpoint: {item.index.fqn} is not a tensor; non-tensor state is stored "
                                      f"as JSON beside the tensors (split_state)")
                t = planner.resolve_data(item).detach().cpu().contiguous()
                sizes = tuple(item.tensor_data.chunk.sizes)
                if tuple(t.shape) != sizes:
                    raise HibariError(f"checkpoint: {item.index.fqn}: chunk shape {list(t.shape)} != planned "
                                      f"{list(sizes)}")
                offset = f.tell()
                f.write(tensor_bytes(t))
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=ChunkLocation(file_name, offset, length, sizes, t.dtype)))
            f.flush()
            if self.sync_files:
                os.fsync(f.fileno())
        return results

    def finish(self, metadata: Metadata, results) -> None:
        locations = {wr.index: wr.storage_data for rank_results in results for wr in rank_results}
        tensors, files = {}, {}
        for fqn, meta in metadata.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                raise HibariError(f"checkpoint: {fqn} is not a tensor; it cannot be stored in {DCP_METADATA_JSON}")
            chunks = []
            for chunk in meta.chunks:
                loc = locations[MetadataIndex(fqn, chunk.offsets)]
                chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": loc.relative_path,
                               "offset": loc.offset, "length": loc.length})
                files[loc.relative_path] = max(files.get(loc.relative_path, 0), loc.offset + loc.length)
            tensors[fqn] = {"dtype": _dtype_name(meta.properties.dtype), "size": list(meta.size), "chunks": chunks}
        doc = {"format": STORAGE_FORMAT, "version": STORAGE_VERSION, "files": files, "tensors": tensors}
        final = Path(self.path) / DCP_METADATA_JSON
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
                f.flush()
                if self.sync_files:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as err:
            raise OSError(err.errno, err.strerror or str(err), str(tmp)) from None


# ------------------------------------------------------------------------------------------------------ reading
def _bad(path: Path, what: str) -> HibariError:
    return HibariError(f"{path}: bad checkpoint metadata ({what})")


def _int_list(value, path: Path, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise _bad(path, f"{what} is not a list of non-negative integers")
    return value


def read_index(ckpt_dir: str | Path) -> tuple[Metadata, dict]:
    """(DCP Metadata built from dcp_metadata.json, {file: minimum size in bytes}); one-line errors naming the file."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / DCP_METADATA_JSON
    if not path.is_file():
        legacy = " (it has a pickled DCP .metadata, which hibari does not load: it could run code)" \
            if (ckpt_dir / ".metadata").exists() else ""
        raise HibariError(f"{ckpt_dir}: not a loadable hibari checkpoint: {DCP_METADATA_JSON} not found{legacy}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != STORAGE_FORMAT:
        raise _bad(path, f"expected format {STORAGE_FORMAT!r}")
    if doc.get("version") != STORAGE_VERSION:
        raise _bad(path, f"version {doc.get('version')!r}, this hibari reads version {STORAGE_VERSION}")
    files, tensors = doc.get("files"), doc.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, dict):
        raise _bad(path, "expected 'files' and 'tensors' objects")
    for name, size in files.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or \
                not isinstance(size, int) or size < 0:
            raise _bad(path, f"file entry {name!r}")
    state_md, storage = {}, {}
    for fqn, t in tensors.items():
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES or not isinstance(t.get("chunks"), list):
            raise _bad(path, f"tensor {fqn!r}")
        dtype = _DTYPES[t["dtype"]]
        size = _int_list(t.get("size"), path, f"size of {fqn!r}")
        chunks = []
        for c in t["chunks"]:
            if not isinstance(c, dict) or c.get("file") not in files:
                raise _bad(path, f"chunk of {fqn!r} names no listed file")
            offsets = _int_list(c.get("offsets"), path, f"chunk offsets of {fqn!r}")
            sizes = _int_list(c.get("sizes"), path, f"chunk sizes of {fqn!r}")
            start, length = c.get("offset"), c.get("length")
            if len(offsets) != len(size) or len(sizes) != len(size) or \
                    any(o + s > g for o, s, g in zip(offsets, sizes, size)):
                raise _bad(path, f"chunk of {fqn!r} lies outside the tensor")
            if not isinstance(start, int) or not isinstance(length, int) or start < 0 or \
                    length != math.prod(sizes) * dtype.itemsize or start + length > files[c["file"]]:
                raise _bad(path, f"byte range of a chunk of {fqn!r}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage[MetadataIndex(fqn, offsets)] = ChunkLocation(c["file"], start, length, tuple(sizes), dtype)
        state_md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=torch.Size(size),
                                              chunks=chunks)
    return Metadata(state_dict_metadata=state_md, storage_data=storage, storage_meta=StorageMeta()), files


def check_files(ckpt_dir: str | Path, files: dict) -> None:
    """Every shard the index names exists and is long enough (a missing or truncated shard: one line naming it)."""
    for name, size in files.items():
        path = Path(ckpt_dir) / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise HibariError(f"{path}: checkpoint shard missing") from None
        if actual < size:
            raise HibariError(f"{path}: checkpoint shard truncated ({actual} bytes, expected {size})")


class JsonReader(FileSystemReader):
    """DCP StorageReader for JsonWriter's layout: Metadata from JSON, tensors from raw bytes. Never unpickles."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never asks for a rank-local pickled index
        if self._metadata is None:
            self._metadata, files = read_index(self.path)
            check_files(self.path, files)
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan, planner) -> torch.futures.Future:
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in per_file.items():
            path = Path(self.path) / relative_path
            with open(path, "rb") as f:
                for req in reqs:
                    if req.type == LoadItemType.BYTE_IO:
                        raise HibariError(f"{path}: non-tensor item {req.dest_index.fqn!r} (hibari stores only "
                                          f"tensors here)")
                    loc: ChunkLocation = self.storage_data[req.storage_index]
                    buf = bytearray(loc.length)
                    f.seek(loc.offset)
                    if f.readinto(buf) != loc.length:
                        raise HibariError(f"{path}: checkpoint shard truncated (chunk of {req.dest_index.fqn!r} "
                                          f"at byte {loc.offset} is incomplete)")
                    if loc.length:
                        tensor = torch.frombuffer(buf, dtype=loc.dtype).reshape(loc.sizes)
                    else:
                        tensor = torch.empty(loc.sizes, dtype=loc.dtype)
                    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise HibariError(f"{path}: {req.dest_index.fqn}: stored chunk {list(tensor.shape)} does "
                                          f"not fit {list(target.shape)}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that never unpickles a non-tensor value (DCP's does, without weights_only)."""

    def load_bytes(self, read_item, value) -> None:
        raise HibariError(f"checkpoint: refusing to unpickle non-tensor item {read_item.dest_index.fqn!r}")


# ------------------------------------------------------------------------------------------- state splitting
def _flatten(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(value, name: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    raise HibariError(f"checkpoint: state {name!r} is a {type(value).__name__}; only tensors and JSON values "
                      f"(numbers, strings, lists) can be stored")


def split_state(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """(nested state with only tensor leaves, {flat key: JSON value} of the other leaves)."""
    tensors, extra = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            sub_t, sub_e = split_state(value, name + ".")
            tensors[key] = sub_t
            extra.update(sub_e)
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            extra[name] = _plain(value, name)
    return tensors, extra


def merge_extra(state: dict, extra: dict, source: str) -> None:
    """Put JSON values back into the non-tensor leaves of `state` (in place), restoring tuples where it had tuples.
    Keys of `state` that `extra` lacks keep their current value; keys `extra` has beyond `state` are ignored (a
    different layout holds other parameters)."""
    for key, value in _flatten(state).items():
        if isinstance(value, torch.Tensor) or key not in extra:
            continue
        new = extra[key]
        if isinstance(value, tuple) and isinstance(new, list):
            new = tuple(new)
        parts = key.split(".")
        node = state
        # walk the nested dicts: flat keys were joined with ".", but dict keys may contain "." themselves
        while parts:
            for n in range(len(parts), 0, -1):
                head = ".".join(parts[:n])
                if head in node:
                    if n == len(parts):
                        node[head] = new
                        parts = []
                    else:
                        node, parts = node[head], parts[n:]
                    break
            else:
                raise HibariError(f"{source}: cannot place state {key!r}")


# ------------------------------------------------------------------------------------------------ save / load
def _first_failure(err: CheckpointException) -> BaseException:
    for failure in err.failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        return getattr(exc, "exception", exc)
    return err


def describe_failure(err: BaseException) -> str:
    """One line for an exception DCP raised (CheckpointException wraps the per-rank ones)."""
    if isinstance(err, CheckpointException):
        err = _first_failure(err)
    if isinstance(err, HibariError):
        return str(err)
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def save_state(state: dict, ckpt_dir: str | Path, planner=None, process_group=None, no_dist: bool = False) -> None:
    """DCP-save a tensor-only state dict (see split_state) into `ckpt_dir` in hibari's pickle-free layout."""
    silence_no_pg_warning()
    try:
        dcp.save(state, storage_writer=JsonWriter(str(ckpt_dir)), planner=planner, process_group=process_group,
                 no_dist=no_dist)
    except CheckpointException as err:  # a BaseException: hand the first rank's real error to the caller
        raise _first_failure(err) from None


def async_save_state(state: dict, ckpt_dir: str | Path, process_group=None, async_stager=None):
    """dcp.async_save with hibari's writer; returns DCP's future. async_stager: DCP's staging (default: the
    writer's own, a plain CPU copy per save)."""
    return dcp.async_save(state, storage_writer=JsonWriter(str(ckpt_dir)), process_group=process_group,
                          async_stager=async_stager)


def load_state(state: dict, ckpt_dir: str | Path, metadata: Metadata | None = None, no_dist: bool = False) -> None:
    """Load the tensors of `state` (nested, tensor leaves, loaded in place) from a hibari checkpoint; any layout.
    Errors (missing/truncated shard, bad index) become one-line HibariErrors naming the file."""
    silence_no_pg_warning()
    if metadata is None:
        # read and check the index before DCP does: DCP logs a traceback when its own metadata read fails
        metadata, files = read_index(ckpt_dir)
        check_files(ckpt_dir, files)
    try:
        dcp.load(state, storage_reader=JsonReader(str(ckpt_dir), metadata), planner=SafeLoadPlanner(),
                 no_dist=no_dist)
    except HibariError:
        raise
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise HibariError(f"loading checkpoint {ckpt_dir} failed: {describe_failure(err)}") from None
