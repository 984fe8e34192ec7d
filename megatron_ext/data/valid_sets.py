"""Named validation sets (`data.valid`): one loss curve per held-out set, so forgetting shows as a rising curve.

    data:
      type: indexed
      blend: [[3, data/ja_web], [1, data/en_replay]]
      valid:
        - {name: ja_web, prefix: data/ja_web}          # a blend component: its validation split (data.split)
        - {name: en_wiki, prefix: data/en_wiki_heldout} # any other dataset: all of its documents, never trained on

Each set is read as `train.eval_batches` global batches of the same samples at every evaluation (seeded by
`train.seed`), and logged as `val/<name>/loss` and `val/<name>/ppl`.
"""

from __future__ import annotations

import os

from pydantic import Field

from hibari.config import StrictModel
from hibari.errors import HibariError


class ValidSetConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="set name: the metric is val/<name>/loss")
    prefix: str = Field(min_length=1, description="indexed dataset prefix (.bin/.idx); a data.blend prefix means "
                                                  "that component's validation split, any other the whole dataset")


def check_unique_names(sets: list[ValidSetConfig]) -> list[ValidSetConfig]:
    seen = set()
    for s in sets:
        if s.name in seen:
            raise ValueError(f"validation set name {s.name!r} appears twice")
        seen.add(s.name)
    return sets


def build_valid_sets(sets: list[ValidSetConfig], blend: list[tuple[float, str]], split: tuple[float, float],
                     seq_length: int, num_samples: int, seed: int, cache_dir: str | None = None) -> dict:
    """{name: GPTSampleDataset} of `num_samples` samples each, in `sets` order."""
    from megatron_ext.data import split_document_ranges
    from megatron_ext.data.gpt_dataset import GPTSampleDataset
    from megatron_ext.data.indexed_dataset import IndexedDataset

    in_blend = {os.path.normpath(os.path.abspath(prefix)) for _, prefix in blend}
    out = {}
    for s in sets:
        indexed = IndexedDataset(s.prefix)
        n_docs = len(indexed.document_indices) - 1
        if os.path.normpath(os.path.abspath(s.prefix)) in in_blend:
            start, end = split_document_ranges(n_docs, split)[1]
            if end <= start:
                raise HibariError(f"data.valid {s.name}: {s.prefix} is trained on and its validation split has no "
                                  f"documents ({n_docs} in total, data.split {list(split)}); raise data.split[1]")
        else:
            start, end = 0, n_docs
        out[s.name] = GPTSampleDataset(indexed, start, end, seq_length, num_samples, seed, cache_dir,
                                       f"valid-{s.name}")
    return out
