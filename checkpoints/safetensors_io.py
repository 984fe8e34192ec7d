"""Streaming safetensors I/O: read tensors one at a time, write sharded files with an index.

Reading parses only the header up front; each tensor's bytes are read on demand into a buffer of its own, so a
conversion that drops each tensor after writing it keeps peak memory near the largest tensor, not the model.
The header is validated against the file size: a truncated or corrupt file is a one-line error, not a crash.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from hibari.errors import HibariError
from megatron_ext.checkpoint.storage import tensor_bytes

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_into(fd: int, buf: memoryview, offset: int, path: Path, name: str) -> None:
    """Fill `buf` from file offset `offset` (several reads where the kernel returns short ones, e.g. > 2 GB)."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise HibariError(f"{path}: truncated while reading tensor {name!r}")
        done += got


class LazySafetensors:
    """Tensors of one .safetensors file, read from disk on access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as err:
            raise HibariError(f"{self.path}: cannot open ({err.strerror})") from None
        size = self.path.stat().st_size
        if size < 8:
            raise HibariError(f"{self.path}: truncated or corrupt safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > size - 8:
            raise HibariError(f"{self.path}: truncated or corrupt safetensors file "
                              f"(header of {header_len} bytes, file has {size})")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HibariError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise HibariError(f"{self.path}: corrupt safetensors header entry for {name!r}") from None
            if self._data_start + end > size:
                raise HibariError(f"{self.path}: truncated or corrupt safetensors file (tensor {name!r} ends at "
                                  f"byte {self._data_start + end}, file has {size})")
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * torch.empty((), dtype=dtype).element_size():
                raise HibariError(f"{self.path}: corrupt safetensors header: tensor {name!r} byte range does not "
                                  f"match shape {list(shape)}")
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        # read straight into torch-owned (resizable) memory: one copy from the page cache, and a consumer may
        # free it early (see _LazySavePlanner); tensors sharing a Python buffer cannot be freed that way
        t = torch.empty(shape, dtype=dtype)
        read_into(self._file.fileno(), tensor_bytes(t), self._data_start + begin, self.path, name)
        return t

    def close(self) -> None:
        self._file.close()


def open_hf_weights(hf_dir: str | Path) -> dict[str, LazySafetensors]:
    """Map each tensor name of an HF checkpoint (single file or sharded with an index) to its file."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise HibariError(f"{index}: corrupt index (expected a JSON object with 'weight_map')") from None
        files = {f: LazySafetensors(hf_dir / f) for f in sorted(set(weight_map.values()))}
        out = {}
        for name, fname in weight_map.items():
            if name not in files[fname]._entries:
                raise HibariError(f"{index}: tensor {name!r} is listed in {fname} but not stored there")
            out[name] = files[fname]
        return out
    if single.is_file():
        f = LazySafetensors(single)
        return {name: f for name in f.keys()}
    if list(hf_dir.glob("*.bin")):
        raise HibariError(f"{hf_dir}: only PyTorch .bin weights found; hibari reads safetensors "
                          "(convert with transformers' save_pretrained(safe_serialization=True))")
    raise HibariError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json found")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / int bytes -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                                tensors, metadata: dict | None = None) -> None:
    """Write a .safetensors file whose header is known up front ({name, shape, dtype} in order), consuming
    `tensors` (an iterator of (name, tensor) in the same order) one at a time: memory stays at one tensor."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in specs:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), (got_name, t) in zip(specs, tensors, strict=True):
            if got_name != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor stream out of order: expected {name}, got {got_name}")
            t = t.contiguous()  # held in `t` while its bytes are written (the view does not own them)
            f.write(tensor_bytes(t))  # the tensor's own bytes, no serialised copy
    tmp.replace(path)


def save_sharded(specs: list[tuple[str, tuple[int, ...], torch.dtype]], tensors, out_dir: str | Path,
                 max_shard_bytes: int, metadata: dict | None = None) -> list[Path]:
    """Write tensors as `model.safetensors`, or as numbered shards plus `model.safetensors.index.json` when the
    total exceeds `max_shard_bytes` (transformers' layout). `tensors` yields (name, tensor) in `specs` order and
    is consumed one tensor at a time."""
    out_dir = Path(out_dir)
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    stream = iter(tensors)
    for fname, group in zip(names, groups):
        write_safetensors_streaming(out_dir / fname, group, (next(stream) for _ in group), metadata)
    if len(groups) > 1:
        total = sum(_nbytes(sh, dt) for _, sh, dt in specs)
        weight_map = {name: fname for fname, group in zip(names, groups) for name, _, _ in group}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return [out_dir / n for n in names]
