"""Megatron's MMIDIDX indexed dataset (`PREFIX.bin` + `PREFIX.idx`): format constants and a memory-mapped reader.

Byte layout (little-endian), identical to megatron-core's `IndexedDataset`:
    .idx: magic b"MMIDIDX\\x00\\x00", uint64 version=1, uint8 dtype code, uint64 sequence count,
          uint64 document count (= len(document_indices), one leading 0), int32 sequence lengths,
          int64 sequence byte offsets into .bin, int64 document indices (sequence where each document starts).
    .bin: every sequence's token ids concatenated, in the dtype named by the index.
The writer lives in `data_pipeline.indexed.writer`; both use the constants here so they cannot drift apart.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from hibari.errors import HibariError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType enum: code -> numpy dtype
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                7: np.float32, 8: np.uint16}
CODE_OF_DTYPE: dict[type, int] = {v: k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def token_dtype_for_vocab(vocab_size: int) -> type:
    """Megatron's choice: uint16 when the vocabulary is below 65,500 tokens, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_file_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def dataset_exists(prefix: str | Path) -> bool:
    return data_file_path(prefix).is_file() and index_file_path(prefix).is_file()


def write_index(path: str | Path | object, dtype: type, sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> None:
    """Write a .idx to `path` (a path or a binary file object). Offsets are derived from the lengths."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    doc_idx = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    offsets = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=offsets[1:])
    header = _HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype).type], len(lengths), len(doc_idx))

    def _write(f):
        f.write(header)
        f.write(lengths.tobytes(order="C"))
        f.write(offsets.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))

    if hasattr(path, "write"):
        _write(path)
    else:
        with open(path, "wb") as f:
            _write(f)


class IndexedDataset:
    """Read-only, memory-mapped view of `PREFIX.bin`/`PREFIX.idx`.

    `ds[i]` is sequence i as a numpy array in the stored dtype; `ds.get(i, offset, length)` reads a slice without
    touching the rest. Opening validates the header and that the .bin holds exactly the bytes the .idx describes,
    so a truncated or mismatched pair fails here, naming the file, instead of mid-training.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise HibariError(f"{p}: indexed dataset file not found (expected {self.prefix}.bin and .idx)")
        self.idx_path, self.bin_path = idx_path, bin_path
        idx_size = idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise HibariError(f"{idx_path}: truncated index ({idx_size} bytes, header alone is {_HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise HibariError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic {magic!r})")
        if version != VERSION:
            raise HibariError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise HibariError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        # the optional multimodal modes array (int8 x n_seq) may follow
        if idx_size not in (expected, expected + n_seq):
            raise HibariError(f"{idx_path}: index size {idx_size} bytes does not match its header "
                              f"({n_seq} sequences, {n_doc} document entries -> {expected} bytes)")
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        pos = _HEADER.size
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=pos)
        pos += n_seq * 4
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=pos)
        pos += n_seq * 8
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=pos)
        itemsize = np.dtype(self.dtype).itemsize
        bin_size = bin_path.stat().st_size
        want = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if n_seq else 0
        if bin_size != want:
            raise HibariError(f"{bin_path}: size {bin_size} bytes does not match its index {idx_path} "
                              f"(expects {want} bytes of {np.dtype(self.dtype).name})")
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        itemsize = np.dtype(self.dtype).itemsize
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        start = int(self.sequence_pointers[idx]) // itemsize + offset
        return np.asarray(self._bin[start:start + length])

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError("IndexedDataset index must be an int")
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        return self.get(int(idx))
