"""Streaming safetensors I/O: read tensors lazily from a memory map, write sharded files with an index.

Reading maps the file (copy-on-write, so the source is never modified) and builds each tensor as a view of its own
bytes, so converting a model touches one tensor at a time and peak memory stays near the largest tensor.
The header is validated against the file size: a truncated or corrupt file is a one-line error, not a crash.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from launch.errors import HibariError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class LazySafetensors:
    """Tensors of one .safetensors file, materialised on access as views of a private memory map."""

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
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

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
        flat = torch.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // torch.empty((), dtype=dtype)
                                .element_size(), offset=self._data_start + begin)
        return flat.view(shape)

    def close(self) -> None:
        # views created by get() keep the map alive through their storage; closing the file is enough here
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


def save_sharded(tensors_iter, out_dir: str | Path, total_bytes: int, max_shard_bytes: int,
                 metadata: dict | None = None) -> list[Path]:
    """Write (name, tensor) pairs to `model.safetensors`, or to numbered shards plus an index above the limit.

    Tensors are buffered only up to one shard, so memory stays bounded by `max_shard_bytes`.
    """
    out_dir = Path(out_dir)
    metadata = {"format": "pt", **(metadata or {})}
    if total_bytes <= max_shard_bytes:
        tensors = {name: t.contiguous() for name, t in tensors_iter}
        path = out_dir / "model.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return [path]
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    current = 0
    tmp_names = []

    def flush(shard, i):
        name = f"model-{i:05d}.tmp.safetensors"
        save_file(shard, str(out_dir / name), metadata=metadata)
        tmp_names.append(name)

    shard: dict[str, torch.Tensor] = {}
    for name, t in tensors_iter:
        nbytes = t.numel() * t.element_size()
        if shard and current + nbytes > max_shard_bytes:
            flush(shard, len(tmp_names) + 1)
            shard, current = {}, 0
        shard[name] = t.contiguous()
        weight_map[name] = len(tmp_names) + 1
        current += nbytes
    if shard:
        flush(shard, len(tmp_names) + 1)
    n = len(tmp_names)
    final = {}
    for i, tmp in enumerate(tmp_names, 1):
        dst = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out_dir / tmp).rename(out_dir / dst)
        final[i] = dst
        written.append(out_dir / dst)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return written
