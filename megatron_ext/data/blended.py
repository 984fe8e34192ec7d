"""Weighted blending of several datasets with Megatron's greedy schedule.

Sample i of the blend goes to the dataset whose realised count lags its target the most:
    argmax_d  weight_d * max(i, 1) - count_d          (ties: lowest d; Megatron's helpers.cpp `build_blending_indices`)
so after every step each dataset's count is within about one sample of weight * steps. The rule is sequential; see
`build_blending_indices` for how it is computed exactly with numpy. The result is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hibari.errors import HibariError
from megatron_ext.data.gpt_dataset import save_npy_atomic

BLEND_FORMAT_VERSION = 1


def normalize_weights(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        raise HibariError("data.blend: empty (expected [[weight, prefix], ...])")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise HibariError(f"data.blend: weights must be positive numbers (got {list(weights)})")
    return w / w.sum()


def _greedy_python(weights: list[float], counts: list[int], out: np.ndarray, start: int, stop: int) -> None:
    """Megatron's loop, verbatim, for steps [start, stop) from the given counts (updated in place)."""
    rng_ds = range(len(weights))
    for i in range(start, stop):
        step = i if i > 0 else 1
        best, best_err = 0, weights[0] * step - counts[0]
        for d in rng_ds:
            err = weights[d] * step - counts[d]
            if err > best_err:
                best, best_err = d, err
        out[i] = best
        counts[best] += 1


def build_blending_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[num_samples], dataset_sample_index int64[num_samples]) by Megatron's greedy rule.

    Exact and fast without compiled code: guess a block of choices by merging each dataset's due times
    (count + k) / weight, then check the whole block at once with the greedy rule's own float expression; the
    choices up to the first disagreement are the greedy's (their states were verified), and at the disagreement the
    greedy's choice is taken. For two datasets the guess is almost always right (blocks of thousands of steps);
    where guesses keep failing (three or more datasets with unlucky weights) it runs the plain loop for a stretch.
    """
    w = np.asarray(weights, dtype=np.float64)
    n_ds = len(w)
    dataset_index = np.empty(num_samples, dtype=np.int16)
    if n_ds == 1:
        dataset_index[:] = 0
        return dataset_index, np.arange(num_samples, dtype=np.int64)
    counts = np.zeros(n_ds, dtype=np.int64)
    eye = np.eye(n_ds, dtype=np.int64)
    i, block, failures = 0, 64, 0
    while i < num_samples:
        if failures >= 4:  # guesses keep failing: do a stretch with the plain loop, then try guessing again
            stop = min(num_samples, i + 16384)
            c = [int(x) for x in counts]
            _greedy_python([float(x) for x in w], c, dataset_index, i, stop)
            counts[:] = c
            i, failures, block = stop, 0, 64
            continue
        b = min(block, num_samples - i)
        due = (counts[:, None] + np.arange(b, dtype=np.float64)[None, :]) / w[:, None]
        guess = np.argsort(due.ravel(), kind="stable")[:b] // b  # row-major + stable: ties go to the lower dataset
        onehot = eye[guess]
        before = (np.cumsum(onehot, axis=0) - onehot + counts[None, :]).astype(np.float64)
        steps = np.maximum(np.arange(i, i + b, dtype=np.float64), 1.0)
        greedy = np.argmax(w[None, :] * steps[:, None] - before, axis=1)  # first maximum = Megatron's strict '>'
        wrong = np.flatnonzero(greedy != guess)
        m = int(wrong[0]) if len(wrong) else b
        take = min(m + 1, b)
        chosen = guess[:take]
        if m < b:
            chosen = chosen.copy()
            chosen[m] = greedy[m]
        dataset_index[i:i + take] = chosen
        counts += np.bincount(chosen, minlength=n_ds)
        i += take
        if m == b:
            block, failures = min(block * 2, 1 << 16), 0
        else:
            block = max(64, 2 * m)
            failures = failures + 1 if m < 32 else 0
    # the k-th sample assigned to dataset d is that dataset's sample k
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    for d in range(n_ds):
        where = np.flatnonzero(dataset_index == d)
        dataset_sample_index[where] = np.arange(len(where), dtype=np.int64)
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
        save_npy_atomic(p_ds, ds_idx)
        save_npy_atomic(p_sample, sample_idx)
    except OSError as err:
        raise HibariError(f"index cache dir {cache}: cannot write ({err.strerror}); "
                          f"set data.cache_dir to a writable directory") from None
    return ds_idx, sample_idx
