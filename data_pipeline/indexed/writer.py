"""Write Megatron MMIDIDX datasets: one builder per output, and an ordered merge of per-shard parts."""

from __future__ import annotations

import array
import os
import shutil
from pathlib import Path

import numpy as np

from hibari.errors import HibariError
from megatron_ext.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path, write_index


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class IndexedDatasetBuilder:
    """Append documents (one sequence each), then `finalize()`; files appear atomically (.bin first, then .idx).

    Used as a context manager, an exception removes the partial files, so a crash leaves no half dataset.
    """

    def __init__(self, prefix: str | Path, dtype: type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        self.bin_path, self.idx_path = data_file_path(prefix), index_file_path(prefix)
        self._bin_tmp = _tmp(self.bin_path)
        self._f = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self.num_tokens = 0
        self._max = np.iinfo(self.dtype).max
        self._typecode = {np.uint16: "H", np.int32: "i", np.uint8: "B", np.int64: "q"}.get(self.dtype)
        if self._typecode and array.array(self._typecode).itemsize != np.dtype(self.dtype).itemsize:
            self._typecode = None

    def add_document(self, tokens, checked: bool = False) -> None:
        """Append one sequence. `checked=True` skips the range check when the caller knows every id fits the dtype
        (a tokenizer whose vocabulary is smaller than the dtype's range), which saves two passes per document."""
        if checked and isinstance(tokens, list) and self._typecode:
            arr = array.array(self._typecode, tokens)  # ~20% faster than np.array for Python int lists
            self._f.write(arr)
            self.lengths.append(len(arr))
            self.num_tokens += len(arr)
            return
        arr = np.asarray(tokens)
        if arr.size and (int(arr.max()) > self._max or int(arr.min()) < 0):
            raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}")
        arr = arr.astype(self.dtype, copy=False)
        self._f.write(arr.tobytes())
        self.lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, docs: list, prefix: np.ndarray, suffix: np.ndarray) -> None:
        """Append one sequence per id array in `docs` (each wrapped in `prefix`/`suffix` ids) in one write. The
        caller guarantees every id fits the dtype (ids of a tokenizer whose vocabulary the dtype was chosen for)."""
        if prefix.size or suffix.size:
            parts = []
            for ids in docs:
                if prefix.size:
                    parts.append(prefix)
                parts.append(ids)
                if suffix.size:
                    parts.append(suffix)
        else:
            parts = docs
        block = np.concatenate(parts).astype(self.dtype, copy=False)
        self._f.write(memoryview(block))
        extra = prefix.size + suffix.size
        self.lengths.extend(len(ids) + extra for ids in docs)
        self.num_tokens += int(block.size)

    def finalize(self) -> None:
        self._f.close()
        idx_tmp = _tmp(self.idx_path)
        write_index(idx_tmp, self.dtype, np.asarray(self.lengths, dtype=np.int32),
                    np.arange(len(self.lengths) + 1, dtype=np.int64))
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._f.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def merge_datasets(part_prefixes: list[str | Path], out_prefix: str | Path, move: bool = False) -> tuple[int, int]:
    """Concatenate datasets in the given order into `out_prefix` (same dtype required). Returns (sequences, tokens).
    `move`: the parts are not needed afterwards, so a single part's .bin is renamed instead of copied."""
    parts = [IndexedDataset(p) for p in part_prefixes]
    if not parts:
        raise HibariError("merge: no input datasets")
    dtype = parts[0].dtype
    for p in parts:
        if p.dtype != dtype:
            raise HibariError(f"{p.idx_path}: dtype {np.dtype(p.dtype).name} differs from "
                              f"{np.dtype(dtype).name} of {parts[0].idx_path}")
    lengths = np.concatenate([p.sequence_lengths for p in parts]) if parts else np.zeros(0, np.int32)
    doc_starts = [np.zeros(1, dtype=np.int64)]
    offset = 0
    for p in parts:
        doc_starts.append(np.asarray(p.document_indices[1:], dtype=np.int64) + offset)
        offset += len(p)
    doc_idx = np.concatenate(doc_starts)
    bin_path, idx_path = data_file_path(out_prefix), index_file_path(out_prefix)
    bin_tmp, idx_tmp = _tmp(bin_path), _tmp(idx_path)
    try:
        if move and len(parts) == 1:
            os.replace(parts[0].bin_path, bin_tmp)
        else:
            with open(bin_tmp, "wb") as out:
                for p in parts:
                    with open(p.bin_path, "rb") as f:
                        shutil.copyfileobj(f, out, length=16 << 20)
        write_index(idx_tmp, dtype, lengths, doc_idx)
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
    except BaseException:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    return len(lengths), int(lengths.sum(dtype=np.int64))
