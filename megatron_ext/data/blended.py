"""Weighted blending of several datasets with Megatron's greedy schedule.

Sample i of the blend goes to the dataset whose realised count lags its target the most:
    argmax_d  weight_d * max(i, 1) - count_d          (ties: lowest d; Megatron's helpers.cpp `build_blending_indices`)
so after every step each dataset's count is within about one sample of weight * steps. The loop is sequential by
nature; it runs in plain Python over integers scaled to avoid float drift (~1 µs/step), and its result is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from launch.errors import HibariError
from megatron_ext.data.gpt_dataset import _save_npy_atomic

BLEND_FORMAT_VERSION = 1


def normalize_weights(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        raise HibariError("data.blend: empty (expected [[weight, prefix], ...])")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise HibariError(f"data.blend: weights must be positive numbers (got {list(weights)})")
    return w / w.sum()


def build_blending_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[num_samples], dataset_sample_index int64[num_samples]) by Megatron's greedy rule."""
    weights = [float(x) for x in weights]
    n_ds = len(weights)
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    if n_ds == 1:
        dataset_index[:] = 0
        dataset_sample_index[:] = np.arange(num_samples)
        return dataset_index, dataset_sample_index
    counts = [0] * n_ds
    choices = [0] * num_samples
    rng_ds = range(n_ds)
    for i in range(num_samples):
        step = i if i > 0 else 1
        best, best_err = 0, weights[0] * step - counts[0]
        for d in rng_ds:
            err = weights[d] * step - counts[d]
            if err > best_err:
                best, best_err = d, err
        choices[i] = best
        counts[best] += 1
    dataset_index[:] = choices
    # the k-th sample assigned to dataset d is that dataset's sample k
    order = np.argsort(dataset_index, kind="stable")
    starts = np.zeros(n_ds + 1, dtype=np.int64)
    np.cumsum(np.bincount(dataset_index, minlength=n_ds), out=starts[1:])
    ranks = np.empty(num_samples, dtype=np.int64)
    ranks[order] = np.arange(num_samples) - np.repeat(starts[:-1], np.diff(starts))
    dataset_sample_index[:] = ranks
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """`num_samples` samples interleaved from `datasets` in proportion to `weights` (cached index arrays)."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int, cache_dir: str | Path,
                 name: str = "train", precomputed: tuple[np.ndarray, np.ndarray] | None = None):
        self.datasets, self.name = datasets, name
        self.weights = normalize_weights(weights)
        if precomputed is None:
            precomputed = cached_blending_indices(self.weights, num_samples, cache_dir, name)
        self.dataset_index, self.dataset_sample_index = precomputed
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, ds in enumerate(datasets):
            if counts[d] > len(ds):
                raise HibariError(f"blend component {d} has {len(ds)} samples, blend needs {counts[d]}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]


def cached_blending_indices(weights: np.ndarray, num_samples: int, cache_dir: str | Path,
                            name: str) -> tuple[np.ndarray, np.ndarray]:
    params = {"version": BLEND_FORMAT_VERSION, "weights": [float(w) for w in weights], "num_samples": num_samples}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir)
    p_ds = cache / f"blend-{name}-{key}-dataset_index.npy"
    p_sample = cache / f"blend-{name}-{key}-dataset_sample_index.npy"
    if p_ds.is_file() and p_sample.is_file():
        return np.load(p_ds, mmap_mode="r"), np.load(p_sample, mmap_mode="r")
    ds_idx, sample_idx = build_blending_indices(weights, num_samples)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(p_ds, ds_idx)
        _save_npy_atomic(p_sample, sample_idx)
    except OSError as err:
        raise HibariError(f"index cache dir {cache}: cannot write ({err.strerror}); "
                          f"set data.cache_dir to a writable directory") from None
    return ds_idx, sample_idx
