"""Batched `data tokenize` encoding (data_pipeline/indexed/encode_batches.py) against per-document SentencePiece."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer  # noqa: E402

from data_pipeline.indexed import encode_batches  # noqa: E402
from data_pipeline.indexed.encode_batches import encode_into  # noqa: E402
from data_pipeline.indexed.writer import IndexedDatasetBuilder  # noqa: E402
from data_pipeline.tokenizer.encoder import load_encoder  # noqa: E402
from megatron_ext.data.indexed_dataset import IndexedDataset  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_base_tokenizer(tmp_path_factory.mktemp("tok") / "base")


def _stats():
    return {"documents": 0, "characters": 0, "skipped_missing_text": 0, "skipped_empty": 0,
            "skipped_undecodable": 0}


@pytest.mark.parametrize("batched", [True, False])
def test_batches_equal_per_document_sentencepiece(tmp_path, tokenizer_dir, monkeypatch, batched):
    import sentencepiece as spm

    monkeypatch.setattr(encode_batches, "BATCH_DOCS", 7)  # many batches, one bad document inside one of them
    enc = load_encoder(tokenizer_dir)
    if not batched:
        enc = dataclasses.replace(enc, encode_batch=None)
    good = english_lines(20, seed=3) + japanese_lines(20, seed=4)
    texts = good[:10] + [None, "", "  \n", "bad \ud800 surrogate"] + good[10:]
    stats = _stats()
    with IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as builder:
        encode_into(builder, iter(texts), enc, [enc.bos_id], [enc.eos_id], stats)
    assert stats == {"documents": 40, "characters": sum(map(len, good)), "skipped_missing_text": 1,
                     "skipped_empty": 2, "skipped_undecodable": 1}
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))  # the oracle
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == 40 and ds.dtype is np.uint16
    for i, text in enumerate(good):
        assert ds[i].tolist() == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]


def test_block_write_without_special_tokens(tmp_path, tokenizer_dir):
    import sentencepiece as spm

    enc = load_encoder(tokenizer_dir)
    texts = japanese_lines(30, seed=5)
    stats = _stats()
    with IndexedDatasetBuilder(tmp_path / "ds", np.int32) as builder:
        encode_into(builder, texts, enc, [], [], stats)
        n_tokens = builder.num_tokens
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    expected = [sp.encode(t) for t in texts]
    ds = IndexedDataset(tmp_path / "ds")
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert n_tokens == sum(map(len, expected)) == ds.num_tokens
