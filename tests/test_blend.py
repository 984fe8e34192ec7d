"""GPT sample dataset, weighted blending and `build_indexed_datasets` (Megatron parity, epochs, resume, split)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from data_pipeline.indexed.writer import IndexedDatasetBuilder
from hibari.config import validate
from hibari.errors import ConfigError, HibariError
from megatron_ext.data import (IndexedDataConfig, IndexedDataset, build_indexed_datasets, check_vocab_fits,
                               recorded_vocab_size, split_document_ranges)
from megatron_ext.data.blended import build_blending_indices
from megatron_ext.data.gpt_dataset import GPTSampleDataset, build_sample_index


def _megatron_helpers():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
            from megatron.core.datasets.helpers import build_sample_idx
    except ImportError as err:
        pytest.skip(f"megatron-core not installed ({err}); it is in the dev extra")
    return helpers_cpp, build_sample_idx


def _unique_token_data(prefix, lengths, base=0):
    """Document j holds only token id base+j, so every sample position says which document it came from."""
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        for j, n in enumerate(lengths):
            b.add_document(np.full(n, base + j))
    return IndexedDataset(prefix)


def test_sample_index_matches_megatron_helpers_cpp():
    helpers_cpp, build_sample_idx = _megatron_helpers()
    rng = np.random.default_rng(0)
    for seq in (1, 7, 64):
        sizes = rng.integers(1, 300, size=150).astype(np.int32)
        doc_idx = np.concatenate([rng.permutation(150) for _ in range(3)]).astype(np.int32)
        tpe = int(sizes.sum())
        ref = build_sample_idx(sizes, doc_idx, seq, 3, tpe, True, True)
        ours = build_sample_index(sizes, doc_idx, seq, (3 * tpe - 1) // seq)
        assert np.array_equal(ref.astype(np.int64), ours)


def test_blending_matches_megatron_greedy_and_stays_within_one_sample():
    helpers_cpp, _ = _megatron_helpers()
    dirichlet = np.random.default_rng(0).dirichlet(np.ones(5)).tolist()  # exercises the plain-loop fallback too
    for weights, n in (([0.9, 0.1], 5000), ([0.1, 0.9], 5000), ([0.5, 0.3, 0.15, 0.05], 5000), ([1 / 3] * 3, 5000),
                       (dirichlet, 40000)):
        w = np.asarray(weights)
        ref_ds, ref_sample = np.zeros(n, np.int16), np.zeros(n, np.int64)
        helpers_cpp.build_blending_indices(ref_ds, ref_sample, w, len(w), n, False)
        ds_index, sample_index = build_blending_indices(w, n)
        assert np.array_equal(ds_index, ref_ds) and np.array_equal(sample_index, ref_sample)
        # realised counts after every step are within one sample of weight * steps (with up to 4 datasets; the
        # greedy rule itself can lag a little more with many datasets: 1.22 samples for these 5 weights)
        counts = np.cumsum(np.eye(len(w), dtype=np.int64)[ds_index], axis=0)
        steps = np.arange(1, n + 1)[:, None]
        assert np.abs(counts - w[None, :] * steps).max() <= (1.0 if len(w) <= 4 else 1.5)


def test_samples_cross_documents_with_boundary_ids(tmp_path):
    lengths = [5, 1, 12, 3, 30, 2, 9]
    ids = _unique_token_data(tmp_path / "u", lengths)
    ds = GPTSampleDataset(ids, 0, len(lengths), seq_length=8, num_samples=6, seed=3, cache_dir=tmp_path / "c")
    for i in range(len(ds)):
        s = ds[i]
        tok, doc = s["tokens"], s["document_ids"]
        assert tok.dtype == np.int64 and doc.dtype == np.int32 and len(tok) == len(doc) == 9
        assert doc[0] == 0 and np.all(np.diff(doc) >= 0) and np.all(np.diff(doc) <= 1)
        # inside one document id the source document is constant; a new id starts where the source changes
        for d in np.unique(doc):
            assert len(np.unique(tok[doc == d])) == 1
        changes = np.flatnonzero(np.diff(tok) != 0) + 1
        assert set(changes) <= set(np.flatnonzero(np.diff(doc)) + 1)
    # consecutive unshuffled samples share exactly one token (Megatron's seq_length + 1 layout)
    order = np.argsort(ds.shuffle_index)
    for k in range(len(ds) - 1):
        assert ds[int(order[k])]["tokens"][-1] == ds[int(order[k + 1])]["tokens"][0]


def test_epochs_full_epochs_first_and_every_token_seen(tmp_path):
    lengths = [int(x) for x in np.random.default_rng(1).integers(1, 40, size=50)]
    tpe = sum(lengths)
    ids = _unique_token_data(tmp_path / "u", lengths)
    seq = 16
    per_epoch = (tpe - 1) // seq
    n = int(per_epoch * 2.3)  # 3 epochs, the last one only 30% used -> shuffled separately
    ds = GPTSampleDataset(ids, 0, 50, seq_length=seq, num_samples=n, seed=7, cache_dir=tmp_path / "c")
    assert ds.num_epochs == 3 and len(ds) >= n
    full = ((2 * tpe) - 1) // seq
    # the first `full` served samples are the two full epochs: each document's tokens appear twice (the one token
    # at the end of the stream that no sample covers aside)
    seen = np.zeros(50, dtype=np.int64)
    for i in range(full):
        seen += np.bincount(ds[i]["tokens"][:-1], minlength=50)
    expected = 2 * np.asarray(lengths)
    assert np.abs(seen - expected).sum() <= seq
    assert np.array_equal(np.sort(np.asarray(ds.shuffle_index[:full])), np.arange(full))
    # the full epochs are shuffled together (each document twice), the partial last epoch on its own (Megatron)
    doc_idx = np.asarray(ds.document_index)
    assert np.array_equal(np.bincount(doc_idx[:100], minlength=50), np.full(50, 2))
    assert sorted(doc_idx[100:].tolist()) == list(range(50))


def test_resume_position_and_cache_reuse(tmp_path):
    ids = _unique_token_data(tmp_path / "u", [int(x) for x in np.random.default_rng(2).integers(1, 60, size=80)])
    a = GPTSampleDataset(ids, 0, 80, seq_length=32, num_samples=200, seed=11, cache_dir=tmp_path / "c")
    assert a.built_now
    first_run = [a[i]["tokens"] for i in range(len(a))]
    consumed = 57  # the loop stores consumed_samples in its checkpoint and continues from there
    b = GPTSampleDataset(IndexedDataset(tmp_path / "u"), 0, 80, seq_length=32, num_samples=200, seed=11,
                         cache_dir=tmp_path / "c")
    assert not b.built_now  # index arrays come from the cache
    for i in range(consumed, len(b)):
        assert np.array_equal(b[i]["tokens"], first_run[i])
    c = GPTSampleDataset(ids, 0, 80, seq_length=32, num_samples=200, seed=12, cache_dir=tmp_path / "c")
    assert c.built_now and any(not np.array_equal(c[i]["tokens"], first_run[i]) for i in range(10))


def test_build_indexed_datasets_blend_split_and_default_cache(tmp_path):
    ja = _unique_token_data(tmp_path / "ja", [20] * 100, base=0)
    en = _unique_token_data(tmp_path / "en", [20] * 100, base=1000)
    blend = [(9.0, str(tmp_path / "ja")), (1.0, str(tmp_path / "en"))]
    train, valid = build_indexed_datasets(blend, seq_length=10, num_train_samples=400, num_valid_samples=30,
                                          seed=5, split=(0.9, 0.1))
    assert len(train) == 400 and len(valid) == 30
    assert (tmp_path / "index-cache").is_dir()  # cached next to the data by default
    src = np.array([int(train[i]["tokens"][0] >= 1000) for i in range(400)])
    assert abs(int((src == 1).sum()) - 40) <= 1  # 10% English, within one sample
    train_docs = {int(t) % 1000 for i in range(400) for t in train[i]["tokens"]}
    valid_docs = {int(t) % 1000 for i in range(30) for t in valid[i]["tokens"]}
    assert max(train_docs) < 90 and min(valid_docs) >= 90  # documents 90..99 are held out
    again, _ = build_indexed_datasets(blend, 10, 400, 30, seed=5, split=(0.9, 0.1))
    assert all(np.array_equal(again[i]["tokens"], train[i]["tokens"]) for i in range(0, 400, 37))
    single, none = build_indexed_datasets([(1.0, str(tmp_path / "ja"))], 10, 50, 0, seed=5,
                                          cache_dir=str(tmp_path / "c2"))
    assert len(single) >= 50 and none is None and (tmp_path / "c2").is_dir()
    assert ja.num_tokens == en.num_tokens == 2000


def test_bad_input_errors(tmp_path):
    with pytest.raises(HibariError, match=r"missing\.idx"):
        build_indexed_datasets([(1.0, str(tmp_path / "missing"))], 8, 10, 0, seed=1)
    _unique_token_data(tmp_path / "tiny", [5, 5, 5])
    with pytest.raises(HibariError, match="valid split has no documents"):
        build_indexed_datasets([(1.0, str(tmp_path / "tiny"))], 4, 10, 5, seed=1, split=(0.99, 0.01))
    with pytest.raises(HibariError, match=r"tokenizer vocabulary \(43176 tokens\).*\(32000 rows\)"):
        check_vocab_fits(43176, 32000)
    check_vocab_fits(32000, 32000)
    assert recorded_vocab_size([(1.0, str(tmp_path / "tiny"))]) is None
    (tmp_path / "tiny.json").write_text('{"vocab_size": 43176}')
    assert recorded_vocab_size([(1.0, str(tmp_path / "tiny"))]) == 43176
    assert split_document_ranges(100, (0.98, 0.02)) == [(0, 98), (98, 100)]


def test_config_section():
    cfg = validate(IndexedDataConfig, {"type": "indexed", "blend": [[0.9, "data/ja"], [0.1, "data/en"]]})
    assert cfg.blend == [(0.9, "data/ja"), (0.1, "data/en")] and cfg.split == (0.98, 0.02) and cfg.cache_dir is None
    with pytest.raises(ConfigError, match="blend"):
        validate(IndexedDataConfig, {"blend": [[-1, "x"]]})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(IndexedDataConfig, {"blend": [[1, "x"]], "splt": [1, 0]})
