"""Training samples for the loop: synthetic (seeded, learnable) or Megatron indexed datasets, cut into micro-batches.

Every dataset is random access: `ds[i] -> {"tokens": int64[seq + 1], "document_ids": int32[seq + 1]}`, so the data
position of a run is one number (consumed samples) and a resumed run reads exactly the samples it would have read.
"""

from __future__ import annotations

import numpy as np
import torch

from hibari.errors import ConfigError
from megatron_ext.train.config import SyntheticDataConfig, TrainConfig

_NGRAM_TABLE_KEY = 0x5EED
_VALID_KEY = 1


class SyntheticDataset:
    """Sample i = a random sequence of n-grams drawn from a fixed table (both seeded).

    Within an n-gram every token after the first is predictable, so a model learns the table and the loss drops
    from ln(vocab) towards ~ln(num_ngrams)/ngram_length: a quick, visible signal that training works.
    """

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, num_ngrams: int, ngram_length: int,
                 seed: int, split: int = 0):
        self.seq_length, self.num_samples, self.seed, self.split = seq_length, num_samples, seed, split
        table_rng = np.random.default_rng([seed, _NGRAM_TABLE_KEY])
        self.ngrams = table_rng.integers(0, vocab_size, size=(num_ngrams, ngram_length), dtype=np.int64)
        self._per_sample = -(-(seq_length + 1) // ngram_length)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split, int(i)])
        picks = rng.integers(0, len(self.ngrams), size=self._per_sample)
        tokens = self.ngrams[picks].reshape(-1)[: self.seq_length + 1]
        return {"tokens": tokens, "document_ids": np.zeros(self.seq_length + 1, dtype=np.int32)}


def build_datasets(cfg: TrainConfig, vocab_size: int):
    """(train_ds, valid_ds or None) for the whole run."""
    t = cfg.train
    num_train = t.steps * t.global_batch_size
    num_valid = t.eval_batches * t.global_batch_size if t.eval_interval > 0 else 0
    d = cfg.data
    if isinstance(d, SyntheticDataConfig):
        v = d.vocab_size or vocab_size
        if v > vocab_size:
            raise ConfigError(f"field data.vocab_size: {v} exceeds the model's vocabulary ({vocab_size})")
        seed = t.seed if d.seed is None else d.seed
        train = SyntheticDataset(v, t.seq_length, num_train, d.num_ngrams, d.ngram_length, seed, split=0)
        valid = (SyntheticDataset(v, t.seq_length, num_valid, d.num_ngrams, d.ngram_length, seed, split=_VALID_KEY)
                 if num_valid else None)
        return train, valid
    # indexed: imported here, the dataset code is only needed by runs that use it
    from megatron_ext.data import build_indexed_datasets

    return build_indexed_datasets([tuple(b) for b in d.blend], t.seq_length, num_train, num_valid, t.seed,
                                  split=tuple(d.split), cache_dir=d.cache_dir)


def build_named_valid_sets(cfg: TrainConfig) -> dict:
    """{name: dataset} of `data.valid` (indexed data), `train.eval_batches` global batches each; {} without."""
    d, t = cfg.data, cfg.train
    if isinstance(d, SyntheticDataConfig) or not d.valid or not t.eval_interval:
        return {}
    from megatron_ext.data.valid_sets import build_valid_sets

    return build_valid_sets(d.valid, [tuple(b) for b in d.blend], tuple(d.split), t.seq_length,
                            t.eval_batches * t.global_batch_size, t.seed, d.cache_dir)


def micro_batches(ds, first_sample: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, device: torch.device):
    """The micro-batches of this dp rank for the global batch starting at sample `first_sample`.

    Micro-step a of dp rank r reads samples first + (a * dp_size + r) * micro + [0, micro). Yields
    (tokens [micro, seq], labels [micro, seq], document_ids [micro, seq]). On CUDA the host arrays are pinned and
    copied with non_blocking=True (the copy is queued on the stream, the host goes on reading the next batch).
    """
    accum = global_batch_size // (micro_batch_size * dp_size)
    for a in range(accum):
        start = first_sample + (a * dp_size + dp_rank) * micro_batch_size
        samples = [ds[start + j] for j in range(micro_batch_size)]
        tokens = _to_device(torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples])),
                            device)
        docs = _to_device(torch.from_numpy(np.stack([np.asarray(s["document_ids"], dtype=np.int64)
                                                     for s in samples])), device)
        yield (tokens[:, :-1], tokens[:, 1:], docs[:, :-1])


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # one pinned staging copy per array: an asynchronous H2D copy needs page-locked memory (from pageable
        # memory the driver copies synchronously); torch's pinned allocator keeps the block alive until the copy
        # has run
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class StepBatches:
    """The micro-batches of one optimizer step, loaded one step ahead.

    `get(first_sample)` returns the step's micro-batches: the prefetched ones when `prefetch(first_sample)` was
    called for that step, else loaded now. The trainer prefetches step N+1 right after queueing step N's work, so
    on a GPU the host reads samples (and queues the non-blocking copy) while the device computes. The data of a step
    is a pure function of its first sample, so prefetching never changes what a step trains on (or a resume).
    """

    def __init__(self, load):
        self._load = load  # first_sample -> list of (tokens, labels, document_ids)
        self._first_sample: int | None = None
        self._batches: list | None = None

    def get(self, first_sample: int) -> list:
        if self._first_sample == first_sample:
            batches = self._batches
        else:
            batches = self._load(first_sample)
        self._first_sample, self._batches = None, None
        return batches

    def prefetch(self, first_sample: int) -> None:
        self._first_sample, self._batches = first_sample, self._load(first_sample)

    @property
    def prefetched(self) -> int | None:
        """The first sample of the step held, or None."""
        return self._first_sample
