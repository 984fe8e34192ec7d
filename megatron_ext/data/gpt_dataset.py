"""Fixed-length GPT training samples drawn across document boundaries, as Megatron's `GPTDataset` does.

Three index arrays describe an epoch-shuffled stream of documents cut into samples of `seq_length + 1` tokens
(sample i is stream tokens [i*seq_length, (i+1)*seq_length], so consecutive samples share one token):
    document_index  the documents in stream order: every epoch is a fresh permutation of the split's documents
    sample_index    (num_samples + 1, 2): (position in document_index, token offset) of each sample's first token;
                    row i+1 is also sample i's last token (inclusive), exactly as Megatron's helpers.cpp stores it
    shuffle_index   the order samples are served in
When the last epoch is only partly needed (< 80% of an epoch, Megatron's rule), it is shuffled separately so that
the full epochs are served completely before any sample of the partial one. All three are built with vectorized
numpy (no compiled helper), cached as .npy files keyed by a hash of every input, and memory-mapped on reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hibari.errors import HibariError
from hibari.io import atomic_write
from megatron_ext.data.indexed_dataset import IndexedDataset

INDEX_FORMAT_VERSION = 1  # bump when the algorithm changes so stale caches are not reused


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of epochs whose concatenated stream yields at least `num_samples` samples."""
    if tokens_per_epoch <= 0:
        raise ValueError("tokens_per_epoch must be positive")
    needed_tokens = num_samples * seq_length + 1
    return max(1, -(-needed_tokens // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator,
                         separate_final_epoch: bool) -> np.ndarray:
    """Documents in stream order: `num_epochs` copies, shuffled (the final epoch alone when separated)."""
    documents = np.asarray(documents, dtype=np.int32 if len(documents) < 2**31 else np.int64)
    if not separate_final_epoch or num_epochs == 1:
        doc_idx = np.tile(documents, num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate([first, last])


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) int64 rows (position in document_index, offset) — vectorized helpers.cpp.

    Row k is the stream position k*seq_length: the first token of sample k and the last token of sample k-1.
    Zero-length documents are stepped over (searchsorted 'right' lands on the next non-empty one).
    """
    stream_lengths = sequence_lengths[document_index].astype(np.int64)
    cum = np.zeros(len(stream_lengths) + 1, dtype=np.int64)
    np.cumsum(stream_lengths, out=cum[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if positions[-1] >= cum[-1]:
        raise ValueError("stream too short for the requested samples")
    doc_pos = np.searchsorted(cum, positions, side="right") - 1
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = doc_pos
    sample_idx[:, 1] = positions - cum[doc_pos]
    return sample_idx


def build_shuffle_index(num_samples_first: int, total_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation of [0, total): [0, first) and [first, total) are shuffled separately (Megatron's layout)."""
    dtype = np.uint32 if total_samples < 2**32 - 1 else np.int64
    first = np.arange(num_samples_first, dtype=dtype)
    rng.shuffle(first)
    if num_samples_first == total_samples:
        return first
    last = np.arange(num_samples_first, total_samples, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Concurrent ranks never np.load a half-written index cache."""
    with atomic_write(path) as f:
        np.save(f, array)


def default_cache_dir(prefix: str | Path) -> Path:
    """Index caches live next to the data so every run on the same data reuses them."""
    return Path(f"{prefix}").parent / "index-cache"


class GPTSampleDataset:
    """Samples of `seq_length + 1` tokens from documents [doc_start, doc_end) of one indexed dataset.

    `ds[i]` -> {"tokens": int64[seq_length+1], "document_ids": int32[seq_length+1]}; document_ids numbers the
    document pieces inside the sample from 0 (for document-boundary attention masks). Deterministic in
    (data, doc range, seq_length, num_samples, seed): resuming = continuing from the number of samples consumed.
    """

    def __init__(self, indexed: IndexedDataset, doc_start: int, doc_end: int, seq_length: int, num_samples: int,
                 seed: int, cache_dir: str | Path | None = None, name: str = "train"):
        if seq_length < 1:
            raise HibariError(f"seq_length must be >= 1 (got {seq_length})")
        self.indexed, self.seq_length, self.name = indexed, seq_length, name
        doc_indices = indexed.document_indices
        seq_start, seq_end = int(doc_indices[doc_start]), int(doc_indices[doc_end])
        self.documents = np.arange(seq_start, seq_end, dtype=np.int64)
        tokens_per_epoch = int(indexed.sequence_lengths[seq_start:seq_end].sum(dtype=np.int64))
        if tokens_per_epoch < 2:
            raise HibariError(f"{indexed.prefix}: the {name} split has {tokens_per_epoch} tokens "
                              f"({seq_end - seq_start} documents); need at least 2 to make a sample")
        self.tokens_per_epoch = tokens_per_epoch
        num_samples = max(int(num_samples), 1)
        self.num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)

        params = {"version": INDEX_FORMAT_VERSION, "prefix": os.path.abspath(indexed.prefix),
                  "idx_bytes": indexed.idx_path.stat().st_size, "bin_bytes": indexed.bin_path.stat().st_size,
                  "doc_range": [doc_start, doc_end], "seq_length": seq_length, "num_samples": num_samples,
                  "seed": seed}
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix)
        base = f"{Path(indexed.prefix).name}-{name}-{key}"
        paths = {k: cache / f"{base}-{k}.npy" for k in ("document_index", "sample_index", "shuffle_index")}
        self.cache_paths = paths
        if all(p.is_file() for p in paths.values()):
            self.built_now = False
            arrays = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
        else:
            self.built_now = True
            arrays = self._build(num_samples, seed)
            try:
                cache.mkdir(parents=True, exist_ok=True)
                for k, p in paths.items():
                    save_npy_atomic(p, arrays[k])
                (cache / f"{base}-params.json").write_text(json.dumps(params, indent=1), encoding="utf-8")
            except OSError as err:
                raise HibariError(f"index cache dir {cache}: cannot write ({err.strerror}); "
                                  f"set data.cache_dir to a writable directory") from None
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self, num_samples: int, seed: int) -> dict[str, np.ndarray]:
        seq, tpe, epochs = self.seq_length, self.tokens_per_epoch, self.num_epochs
        separate = False
        if epochs > 1:
            from_earlier = ((epochs - 1) * tpe - 1) // seq
            from_final = num_samples - from_earlier
            per_epoch = (tpe - 1) // seq
            separate = from_final < int(0.8 * per_epoch)
        rng = np.random.default_rng(seed)
        doc_idx = build_document_index(self.documents, epochs, rng, separate)
        total = (epochs * tpe - 1) // seq
        sample_idx = build_sample_index(self.indexed.sequence_lengths, doc_idx, seq, total)
        first = ((epochs - 1) * tpe - 1) // seq if separate else total
        shuffle_idx = build_shuffle_index(first, total, rng)
        return {"document_index": doc_idx, "sample_index": sample_idx, "shuffle_index": shuffle_idx}

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_pieces(self, idx: int) -> list[tuple[int, int, int]]:
        """(sequence id, offset, length) pieces making up sample `idx` (after shuffling)."""
        i = int(self.shuffle_index[idx])
        d0, o0 = (int(x) for x in self.sample_index[i])
        d1, o1 = (int(x) for x in self.sample_index[i + 1])
        lengths = self.indexed.sequence_lengths
        if d0 == d1:
            return [(int(self.document_index[d0]), o0, o1 - o0 + 1)]
        pieces = [(int(self.document_index[d0]), o0, int(lengths[self.document_index[d0]]) - o0)]
        for d in range(d0 + 1, d1):
            doc = int(self.document_index[d])
            if lengths[doc] > 0:
                pieces.append((doc, 0, int(lengths[doc])))
        pieces.append((int(self.document_index[d1]), 0, o1 + 1))
        return [p for p in pieces if p[2] > 0]

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        pieces = self.sample_pieces(idx)
        tokens = np.concatenate([self.indexed.get(doc, off, n) for doc, off, n in pieces]).astype(np.int64)
        doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), [n for _, _, n in pieces])
        assert len(tokens) == self.seq_length + 1, (len(tokens), pieces)
        return {"tokens": tokens, "document_ids": doc_ids}
