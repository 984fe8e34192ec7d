"""`hibari tokenizer train|expand`: Llama-style SentencePiece, id-preserving merge, HF files that match SentencePiece."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer, write_corpus  # noqa: E402

from launch.cli import main as hibari  # noqa: E402
from hibari.errors import HibariError  # noqa: E402

EDGE_TEXTS = ["  leading spaces", "trailing space ", "tab\tand\nnewline", "東京 と 京都\n\n改行", "絵文字😀と鬱",
              "ＡＢＣ全角と半角ｶﾅ", "12345 digits", " ", "mixed English と日本語 text."]


def _sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _assert_hf_matches_sp(tok_dir: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    sp = _sp(tok_dir / "tokenizer.model")
    assert len(tok) == sp.get_piece_size()
    for t in texts:
        assert tok.encode(t, add_special_tokens=False) == sp.encode(t), t
    assert tok("日本")["input_ids"][0] == sp.bos_id()  # Llama convention: BOS added by default


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "ja.jsonl.zst", japanese_lines(300) + ["", "ＡＢＣ全角"])
    rc = hibari(["tokenizer", "train", "--input", str(root / "ja.jsonl.zst"), "--vocab-size", "520", "--out",
                 str(root / "ja"), "--threads", "1", "--normalization", "nfkc"])
    assert rc == 0
    return root, root / "ja"


def test_train_writes_llama_style_model_and_matching_hf_files(trained):
    from data_pipeline.tokenizer.spm import load_model_proto

    root, ja = trained
    proto = load_model_proto(ja / "tokenizer.model")
    assert len(proto.pieces) == 520
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity" and proto.normalizer_spec.add_dummy_prefix
    pieces = {p.piece for p in proto.pieces}
    assert "<0xE3>" in pieces and "\u2581" in pieces
    assert not any("Ａ" in p for p in pieces)  # --normalization nfkc normalized the training text
    meta = json.loads((ja / "hibari_tokenizer.json").read_text())
    assert meta["documents"] == 302 and meta["skipped_empty"] == 1 and meta["lines"] == 301
    _assert_hf_matches_sp(ja, japanese_lines(40, seed=3) + EDGE_TEXTS)


def test_expand_keeps_ids_appends_new_and_hf_matches(trained, tmp_path, capsys):
    from data_pipeline.tokenizer.spm import load_model_proto

    root, ja = trained
    base = make_base_tokenizer(tmp_path / "base")
    rc = hibari(["tokenizer", "expand", "--base", str(base), "--add", str(ja / "tokenizer.model"), "--out",
                 str(tmp_path / "merged"), "--pad-to-multiple", "64"])
    assert rc == 0
    report = capsys.readouterr().out
    assert "characters per token" in report
    b, a = load_model_proto(base / "tokenizer.model"), load_model_proto(ja / "tokenizer.model")
    m = load_model_proto(tmp_path / "merged" / "tokenizer.model")
    for i, p in enumerate(b.pieces):  # every original id, score and type unchanged
        assert (m.pieces[i].piece, m.pieces[i].score, m.pieces[i].type) == (p.piece, p.score, p.type)
    assert m.normalizer_spec == b.normalizer_spec  # the base normalizer is kept
    base_pieces = {p.piece for p in b.pieces}
    add_normal = [p.piece for p in a.pieces if p.type == 1]
    new = [p.piece for p in m.pieces[len(b.pieces):]]
    assert set(new) == set(add_normal) - base_pieces and len(new) == len(set(new))
    assert all(m.pieces[i].score > m.pieces[i + 1].score for i in range(len(b.pieces), len(m.pieces) - 1))
    meta = json.loads((tmp_path / "merged" / "hibari_tokenizer.json").read_text())
    assert meta["vocab_size"] == len(m.pieces) and meta["padded_vocab_size"] % 64 == 0
    assert meta["skipped_present"] == len(add_normal) - len(new) > 0
    assert meta["chars_per_token_after"] > 2 * meta["chars_per_token_before"]
    # the merged model encodes Japanese with new pieces, and HF agrees with SentencePiece
    sp = _sp(tmp_path / "merged" / "tokenizer.model")
    assert max(sp.encode(japanese_lines(1)[0])) >= len(b.pieces)
    _assert_hf_matches_sp(tmp_path / "merged", japanese_lines(40, seed=4) + english_lines(20, seed=4) + EDGE_TEXTS)


def test_expand_chars_per_token_on_shared_japanese_sample(trained, tmp_path):
    sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ja-plain-text" / "aozora"
    if not sample.is_dir():
        pytest.skip(f"shared sample data not present ({sample})")
    from data_pipeline.tokenizer.spm import expand_tokenizer

    root, ja = trained
    base = make_base_tokenizer(tmp_path / "base")
    s = expand_tokenizer(base, ja, tmp_path / "merged", sample=[str(sample / "bocchan.txt")])
    assert s["sample_texts"] > 100 and s["chars_per_token_after"] > s["chars_per_token_before"]
    # real CC-derived Japanese documents: HF ids == SentencePiece ids for the merged tokenizer
    web = sample.parents[1] / "ja-web-text" / "fineweb2-edu-japanese-100" / "fineweb_100_samples.jsonl"
    if web.is_file():
        from hibari.io import read_jsonl

        docs = [r["text"] for r in read_jsonl(web)]
        assert len(docs) == 100
        _assert_hf_matches_sp(tmp_path / "merged", docs)


def test_tokenizer_bad_input(tmp_path, trained, capsys):
    from data_pipeline.tokenizer.spm import expand_tokenizer

    root, ja = trained
    with pytest.raises(HibariError, match="SentencePiece model not found"):
        expand_tokenizer(tmp_path / "nope", ja, tmp_path / "o")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01junk")
    with pytest.raises(HibariError, match="not a SentencePiece model"):
        expand_tokenizer(tmp_path / "junk.model", ja, tmp_path / "o")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(english_lines(200)), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=100, model_type="unigram", minloglevel=2, num_threads=1)
    with pytest.raises(HibariError, match="must be a BPE SentencePiece model"):
        expand_tokenizer(tmp_path / "uni.model", ja, tmp_path / "o")
    write_corpus(tmp_path / "empty.jsonl", ["", " "])
    rc = hibari(["tokenizer", "train", "--input", str(tmp_path / "empty.jsonl"), "--vocab-size", "400", "--out",
                 str(tmp_path / "t")])
    assert rc == 2 and "no text to train on" in capsys.readouterr().err
