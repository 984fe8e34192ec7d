"""Megatron .bin/.idx writing/reading and `hibari data tokenize` (golden bytes, megatron-core parity, bad input)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer, write_corpus  # noqa: E402

from data_pipeline.indexed.writer import IndexedDatasetBuilder, merge_datasets  # noqa: E402
from launch.cli import main as hibari  # noqa: E402
from hibari.errors import HibariError  # noqa: E402
from megatron_ext.data.indexed_dataset import IndexedDataset, token_dtype_for_vocab  # noqa: E402


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)


def _megatron_reader():
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    except ImportError as err:
        pytest.skip(f"megatron-core not installed ({err}); it is in the dev extra")
    return MegatronIndexedDataset


def test_index_bytes_match_format_note(tmp_path):
    docs = [np.array([5, 6, 7]), np.array([65000]), np.array([1, 2])]
    _write(tmp_path / "d", docs)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, n_seq, n_doc) == (1, 8, 3, 4)  # uint16 is dtype code 8; doc index has a leading 0
    lengths = np.frombuffer(raw, np.int32, 3, 34)
    pointers = np.frombuffer(raw, np.int64, 3, 34 + 12)
    doc_idx = np.frombuffer(raw, np.int64, 4, 34 + 12 + 24)
    assert lengths.tolist() == [3, 1, 2]
    assert pointers.tolist() == [0, 6, 8]  # byte offsets: 2 bytes per uint16 token
    assert doc_idx.tolist() == [0, 1, 2, 3]
    assert len(raw) == 34 + 12 + 24 + 32
    assert np.frombuffer((tmp_path / "d.bin").read_bytes(), np.uint16).tolist() == [5, 6, 7, 65000, 1, 2]


def test_dtype_choice_follows_megatron():
    assert token_dtype_for_vocab(32000) is np.uint16
    assert token_dtype_for_vocab(65499) is np.uint16
    assert token_dtype_for_vocab(65500) is np.int32
    assert token_dtype_for_vocab(128256) is np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reader_roundtrip_and_megatron_core_agrees(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 65000 if dtype is np.uint16 else 150000
    docs = [rng.integers(0, high, size=int(n)) for n in rng.integers(1, 50, size=40)]
    _write(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 40 and ds.dtype is dtype
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()
    assert ds.get(3, offset=1, length=2).tolist() == docs[3][1:3].tolist()
    mds = _megatron_reader()(str(tmp_path / "d"))
    assert len(mds) == len(ds)
    for i in range(len(ds)):
        assert np.array_equal(mds[i], ds[i])
    assert np.array_equal(mds.document_indices, ds.document_indices)


def test_merge_keeps_order_and_document_index(tmp_path):
    _write(tmp_path / "a", [np.array([1, 2]), np.array([3])])
    _write(tmp_path / "b", [np.array([4, 5, 6])])
    n_seq, n_tok = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    ds = IndexedDataset(tmp_path / "ab")
    assert (n_seq, n_tok) == (3, 6)
    assert [ds[i].tolist() for i in range(3)] == [[1, 2], [3], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]


def test_missing_or_mismatched_files_name_the_file(tmp_path):
    _write(tmp_path / "d", [np.array([1, 2, 3]), np.array([4])])
    with pytest.raises(HibariError, match="nope.idx"):
        IndexedDataset(tmp_path / "nope")
    (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])  # truncated .bin
    with pytest.raises(HibariError, match=r"d\.bin: size 6 bytes does not match"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.bin").unlink()
    with pytest.raises(HibariError, match=r"d\.bin: indexed dataset file not found"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" * 8)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(HibariError, match=r"x\.idx: not a Megatron MMIDIDX index"):
        IndexedDataset(tmp_path / "x")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_base_tokenizer(tmp_path_factory.mktemp("tok") / "base")


def _corpus(tmp_path):
    write_corpus(tmp_path / "a.jsonl.zst", english_lines(60, seed=1) + ["", "   "])
    bad = [{"id": "m", "url": "x"}, {"id": "s", "text": "bad \ud800 surrogate"}, {"id": "n", "text": 5}]
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for t in japanese_lines(30, seed=2):
            f.write(json.dumps({"text": t}) + "\n")
        for rec in bad:
            f.write(json.dumps(rec) + "\n")  # json.dumps escapes the lone surrogate as \ud800
    return [str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b.jsonl")]


def test_data_tokenize_cli_tokens_skips_and_megatron_parity(tmp_path, tokenizer_dir, capsys):
    import sentencepiece as spm

    inputs = _corpus(tmp_path)
    rc = hibari(["data", "tokenize", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output",
                 str(tmp_path / "out" / "mix"), "--workers", "1", "--append-eod", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["documents"] == 90
    assert stats["skipped_empty"] == 2 and stats["skipped_missing_text"] == 2 and stats["skipped_undecodable"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = english_lines(60, seed=1) + japanese_lines(30, seed=2)
    ds = IndexedDataset(tmp_path / "out" / "mix")
    assert ds.dtype is np.uint16 and len(ds) == 90 and stats["tokens"] == ds.num_tokens
    for i, t in enumerate(texts):
        assert ds[i].tolist() == [sp.bos_id()] + sp.encode(t) + [sp.eos_id()]
    mds = _megatron_reader()(str(tmp_path / "out" / "mix"))
    assert all(np.array_equal(mds[i], ds[i]) for i in range(len(ds)))
    assert not (tmp_path / "out" / "mix.parts").exists()  # parts are removed after the merge
    # a completed output is not redone by the same command ...
    assert hibari(["data", "tokenize", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output",
                   str(tmp_path / "out" / "mix"), "--append-eod"]) == 0
    assert "already complete" in capsys.readouterr().out
    # ... and never returned for other options or inputs: refused naming the change, unless --overwrite
    assert hibari(["data", "tokenize", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output",
                   str(tmp_path / "out" / "mix")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "options append_eod: true -> false" in err and "--overwrite" in err
    assert hibari(["data", "tokenize", "--input", inputs[0], "--tokenizer", str(tokenizer_dir), "--output",
                   str(tmp_path / "out" / "mix"), "--append-eod"]) == 2
    assert "input b.jsonl removed" in capsys.readouterr().err
    assert hibari(["data", "tokenize", "--input", inputs[0], "--tokenizer", str(tokenizer_dir), "--output",
                   str(tmp_path / "out" / "mix"), "--append-eod", "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents"] == 60
    assert IndexedDataset(tmp_path / "out" / "mix").num_tokens < ds.num_tokens


def test_parallel_output_is_identical_and_resume_redoes_only_failed_shards(tmp_path, tokenizer_dir):
    from data_pipeline.indexed.tokenize import tokenize_corpus

    inputs = _corpus(tmp_path)
    tokenize_corpus(inputs, str(tokenizer_dir), str(tmp_path / "serial"), workers=1, show_progress=False)
    # a third shard with a broken line fails; the others finish and keep their markers
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(HibariError, match=r"c\.jsonl.*invalid JSON"):
        tokenize_corpus(inputs + [str(broken)], str(tokenizer_dir), str(tmp_path / "par"), workers=2,
                        show_progress=False, keep_parts=True)
    marker = tmp_path / "par.parts" / "done" / "shard-000000.json"
    assert marker.is_file() and not (tmp_path / "par.parts" / "done" / "shard-000002.json").exists()
    before = marker.stat().st_mtime_ns
    broken.write_text('{"text": "fine"}\n', encoding="utf-8")
    s = tokenize_corpus(inputs + [str(broken)], str(tokenizer_dir), str(tmp_path / "par"), workers=2,
                        show_progress=False, keep_parts=True)
    assert marker.stat().st_mtime_ns == before  # not redone
    assert s["documents"] == 91
    serial_bin = (tmp_path / "serial.bin").read_bytes()
    par_bin = (tmp_path / "par.bin").read_bytes()
    assert par_bin.startswith(serial_bin) and len(par_bin) > len(serial_bin)
    # same inputs with 1 or 2 workers -> byte-identical files
    tokenize_corpus(inputs, str(tokenizer_dir), str(tmp_path / "par2"), workers=2, show_progress=False)
    assert (tmp_path / "par2.bin").read_bytes() == serial_bin
    assert (tmp_path / "par2.idx").read_bytes() == (tmp_path / "serial.idx").read_bytes()


def test_data_tokenize_bad_input_is_one_line_error(tmp_path, tokenizer_dir, capsys):
    rc = hibari(["data", "tokenize", "--input", str(tmp_path / "none*.jsonl"), "--tokenizer", str(tokenizer_dir),
                 "--output", str(tmp_path / "o")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    write_corpus(tmp_path / "a.jsonl", ["hello"])
    rc = hibari(["data", "tokenize", "--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path),
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no tokenizer.model or tokenizer.json" in err
