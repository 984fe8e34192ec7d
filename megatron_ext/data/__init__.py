"""Training data for the loop: Megatron .bin/.idx datasets, GPT samples, weighted blends, train/valid split.

Entry point for the training loop:
    train_ds, valid_ds = build_indexed_datasets(cfg.blend, seq_length, num_train_samples, num_valid_samples, seed,
                                                split=cfg.split, cache_dir=cfg.cache_dir)
    train_ds[i] -> {"tokens": int64[seq_length + 1], "document_ids": int32[seq_length + 1]}
Only numpy/pydantic are imported here (no torch), so configs and CLIs can import this module cheaply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import field_validator

from hibari.config import StrictModel
from hibari.errors import HibariError
from megatron_ext.data.blended import BlendedDataset, cached_blending_indices, normalize_weights
from megatron_ext.data.gpt_dataset import GPTSampleDataset, default_cache_dir
from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.valid_sets import ValidSetConfig, check_unique_names

__all__ = ["IndexedDataConfig", "IndexedDataset", "GPTSampleDataset", "BlendedDataset", "build_indexed_datasets",
           "check_vocab_fits", "recorded_vocab_size", "split_document_ranges"]


class IndexedDataConfig(StrictModel):
    """`data:` section for Megatron-format data. `blend` weights are relative (Megatron uses token counts)."""

    type: Literal["indexed"] = "indexed"
    blend: list[tuple[float, str]]
    split: tuple[float, float] = (0.98, 0.02)  # train, validation fractions of each dataset's documents
    cache_dir: str | None = None  # index caches; default: `index-cache/` next to each dataset
    valid: list[ValidSetConfig] = []  # named held-out sets, one val/<name>/loss curve each (valid_sets.py)

    @field_validator("valid")
    @classmethod
    def _check_valid(cls, v):
        return check_unique_names(v)

    @field_validator("blend")
    @classmethod
    def _check_blend(cls, v):
        if not v:
            raise ValueError("expected at least one [weight, prefix] entry")
        for w, prefix in v:
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"weight for {prefix!r} must be a positive number (got {w})")
        return v

    @field_validator("split")
    @classmethod
    def _check_split(cls, v):
        if any(x < 0 for x in v) or sum(v) <= 0 or v[0] <= 0:
            raise ValueError(f"expected two non-negative fractions with a positive train part (got {list(v)})")
        return v


def check_vocab_fits(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Fail at start (not at the first out-of-range embedding lookup) when the tokenizer outgrows the model."""
    if tokenizer_vocab_size > model_vocab_size:
        raise HibariError(f"tokenizer vocabulary ({tokenizer_vocab_size} tokens) is larger than the model's embeddings "
                          f"({model_vocab_size} rows); expand the model first (hibari convert expand-vocab)")


def recorded_vocab_size(blend: list[tuple[float, str]]) -> int | None:
    """Largest tokenizer vocabulary recorded by `hibari data tokenize` (PREFIX.json) over the blend, or None when
    no dataset has a record (e.g. data written by Megatron's own preprocess_data.py)."""
    sizes = []
    for _, prefix in blend:
        path = Path(f"{prefix}.json")
        if path.is_file():
            try:
                sizes.append(int(json.loads(path.read_text(encoding="utf-8"))["vocab_size"]))
            except (ValueError, KeyError, TypeError):
                raise HibariError(f"{path}: corrupt dataset stats (expected a JSON object with vocab_size)") from None
    return max(sizes) if sizes else None


def split_document_ranges(num_documents: int, split: tuple[float, float]) -> list[tuple[int, int]]:
    """Megatron-style contiguous document ranges [(0, a), (a, N)] from normalised fractions."""
    total = float(sum(split))
    a = int(round(split[0] / total * num_documents))
    a = min(max(a, 0), num_documents)
    return [(0, a), (a, num_documents)]


def _build_split(indexed: list[IndexedDataset], ranges: list[tuple[int, int]], weights: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None, name: str):
    if len(indexed) == 1:
        (start, end), ds = ranges[0], indexed[0]
        if end <= start:
            raise HibariError(f"{ds.prefix}: the {name} split has no documents "
                              f"({ds.document_indices.size - 1} documents in total); adjust data.split")
        return GPTSampleDataset(ds, start, end, seq_length, num_samples, seed, cache_dir, name)
    blend_cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed[0].prefix)
    ds_index, ds_sample_index = cached_blending_indices(weights, num_samples, blend_cache, name)
    counts = np.bincount(ds_index, minlength=len(indexed))
    components = []
    for d, (ds, (start, end)) in enumerate(zip(indexed, ranges)):
        if end <= start:
            raise HibariError(f"{ds.prefix}: the {name} split has no documents "
                              f"({ds.document_indices.size - 1} documents in total); adjust data.split")
        # a different seed per component, so two copies of one dataset in a blend are not read in lockstep
        components.append(GPTSampleDataset(ds, start, end, seq_length, int(counts[d]), seed + d, cache_dir, name))
    return BlendedDataset(components, list(weights), num_samples, blend_cache, name,
                          precomputed=(ds_index, ds_sample_index))


def build_indexed_datasets(blend: list[tuple[float, str]], seq_length: int, num_train_samples: int,
                           num_valid_samples: int, seed: int, split: tuple[float, float] = (0.98, 0.02),
                           cache_dir: str | None = None):
    """(train_ds, valid_ds); valid_ds is None when `num_valid_samples` is 0 or the split has no validation part.

    Each dataset's documents are split into contiguous train/valid ranges; each range is sampled over as many
    epochs as needed; the blend interleaves components with Megatron's greedy schedule.
    """
    if not blend:
        raise HibariError("data.blend: empty (expected [[weight, prefix], ...])")
    weights = normalize_weights([w for w, _ in blend])
    indexed = [IndexedDataset(prefix) for _, prefix in blend]  # validates every file before any index build
    ranges = [split_document_ranges(len(ds.document_indices) - 1, split) for ds in indexed]
    train = _build_split(indexed, [r[0] for r in ranges], weights, num_train_samples, seq_length, seed, cache_dir,
                         "train")
    valid = None
    if num_valid_samples > 0 and split[1] > 0:
        valid = _build_split(indexed, [r[1] for r in ranges], weights, num_valid_samples, seq_length, seed,
                             cache_dir, "valid")
    return train, valid
