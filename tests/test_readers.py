"""Document inputs of every data command (data_pipeline/readers.py, hibari/io.py): cut/corrupt compressed files,
bad lines, plain text, parquet / arrow / save_to_disk inputs, byte-identical tokenization from every format."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer  # noqa: E402

from data_pipeline.readers import iter_records, iter_texts, resolve_inputs  # noqa: E402
from hibari.errors import HibariError  # noqa: E402
from hibari.io import read_jsonl  # noqa: E402
from launch.cli import main as hibari  # noqa: E402

REAL_JSONL = Path(__file__).resolve().parents[2] / "shared/data/ja-web-text/fineweb2-edu-japanese-100/" \
                                                  "fineweb_100_samples.jsonl"


def _real_jsonl() -> Path:
    if not REAL_JSONL.is_file():
        pytest.skip(f"shared sample data not present ({REAL_JSONL})")
    return REAL_JSONL


@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_cut_compressed_file_is_an_error_at_every_point(tmp_path, suffix):
    """A real JSONL file compressed, then cut at 40 points: every cut is an error naming the file and the byte
    offset (the old zstd reader returned a short "complete" file at 11 of 40 points)."""
    raw = _real_jsonl().read_bytes()
    expected = [json.loads(line) for line in raw.splitlines() if line.strip()]
    data = zstandard.ZstdCompressor(level=3).compress(raw) if suffix == ".zst" else gzip.compress(raw)
    full = tmp_path / f"full.jsonl{suffix}"
    full.write_bytes(data)
    assert list(read_jsonl(full)) == expected and len(expected) == 100
    errors = []
    for i in range(40):
        cut = len(data) * i // 40
        path = tmp_path / f"cut{i}.jsonl{suffix}"
        path.write_bytes(data[:cut])
        with pytest.raises(HibariError) as exc:
            list(read_jsonl(path))
        errors.append(str(exc.value))
        assert str(path) in errors[-1] and f"byte {cut}" in errors[-1] and "\n" not in errors[-1], errors[-1]
    assert all("truncated" in e for e in errors[1:])


def test_multi_frame_zstd_and_corrupt_data(tmp_path):
    lines = [json.dumps({"text": t}) + "\n" for t in english_lines(50)]
    cctx = zstandard.ZstdCompressor()
    frames = b"".join(cctx.compress("".join(lines[i:i + 10]).encode()) for i in range(0, 50, 10))
    (tmp_path / "multi.jsonl.zst").write_bytes(frames)
    assert [r["text"] for r in read_jsonl(tmp_path / "multi.jsonl.zst")] == english_lines(50)
    bad = bytearray(cctx.compress("".join(lines).encode()))
    bad[4:12] = b"\xff" * 8  # frame header garbage
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(bad))
    with pytest.raises(HibariError, match=r"bad\.jsonl\.zst: corrupt zstd data near byte 0"):
        list(read_jsonl(tmp_path / "bad.jsonl.zst"))


def test_bad_lines_are_errors_with_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(HibariError, match=r"a\.jsonl:2: invalid UTF-8 at byte 13"):
        list(read_jsonl(p))
    p.write_bytes(b'{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(HibariError, match=r"a\.jsonl:3: invalid JSON"):
        list(read_jsonl(p))
    p.write_bytes(b'["a list"]\n')
    with pytest.raises(HibariError, match=r"a\.jsonl:1: expected a JSON object"):
        list(read_jsonl(p))
    t = tmp_path / "a.txt"
    t.write_bytes("一行目\n".encode() + b"\x80bad\n")
    with pytest.raises(HibariError, match=r"a\.txt:2: invalid UTF-8"):
        list(iter_texts(resolve_inputs(str(t))[0]))


def test_text_files_line_and_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\r\nthird", encoding="utf-8")
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("x\ny\n".encode()))
    by_line = [t for s in resolve_inputs(str(tmp_path / "*.txt*")) for t in iter_texts(s)]
    assert by_line == ["first doc", "second doc", "third", "x", "y"]  # blank lines are not documents
    by_file = [t for s in resolve_inputs(str(tmp_path / "*.txt*"), text_format="file") for t in iter_texts(s)]
    assert by_file == ["first doc\n\n  \nsecond doc\nthird", "x\ny"]
    assert list(iter_records(resolve_inputs(str(tmp_path / "a.txt"))[0], text_key="body"))[0] == {"body": "first doc"}


def _docs():
    """Documents with the awkward cases: empty text, a missing text (null), non-ASCII (a lone surrogate cannot be
    stored in parquet/arrow, so that JSONL-only case stays in test_indexed)."""
    texts = english_lines(40, seed=3) + japanese_lines(20, seed=4)
    recs = [{"id": f"d{i}", "text": t, "snapshot": "CC-MAIN-2024-10"} for i, t in enumerate(texts)]
    recs[5]["text"] = ""
    recs[7]["text"] = None
    return recs


def _write_formats(tmp_path: Path, recs: list[dict]) -> dict[str, list[str]]:
    """The same records as JSONL.zst, parquet (small row groups), arrow IPC file and stream, and save_to_disk
    Dataset / DatasetDict directories (built offline with pyarrow and `datasets`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    lines = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=7)
    with pa.ipc.new_file(tmp_path / "docs.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=11)
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=11)
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved_dict"))
    return {"jsonl": [str(tmp_path / "docs.jsonl.zst")], "parquet": [str(tmp_path / "docs.parquet")],
            "arrow": [str(tmp_path / "docs.arrow")], "stream": [str(tmp_path / "stream.arrow")],
            "saved": [str(tmp_path / "saved")], "dict": [str(tmp_path / "saved_dict"), "--split", "train"]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_base_tokenizer(tmp_path_factory.mktemp("tok") / "base")


def test_every_format_tokenizes_to_identical_bin_idx(tmp_path, tokenizer_dir, capsys):
    formats = _write_formats(tmp_path, _docs())
    outputs = {}
    for name, args in formats.items():
        out = tmp_path / "out" / name
        rc = hibari(["data", "tokenize", "--input", *args, "--tokenizer", str(tokenizer_dir), "--output", str(out),
                     "--workers", "1", "--json"])
        assert rc == 0, capsys.readouterr().err
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (stats["documents"], stats["skipped_empty"], stats["skipped_missing_text"],
                stats["skipped_undecodable"]) == (58, 1, 1, 0), name
        outputs[name] = ((tmp_path / "out" / f"{name}.bin").read_bytes(), (tmp_path / "out" / f"{name}.idx").read_bytes())
    assert len(outputs["jsonl"][0]) > 0
    for name, files in outputs.items():
        assert files == outputs["jsonl"], f"{name} differs from the JSONL output"


def test_parquet_row_group_ranges_are_tasks_and_resume(tmp_path, tokenizer_dir, monkeypatch):
    import data_pipeline.readers as readers
    from data_pipeline.indexed.tokenize import tokenize_corpus

    formats = _write_formats(tmp_path, _docs())
    sources = resolve_inputs(formats["parquet"], max_task_bytes=1)  # 60 rows in row groups of 7: 9 tasks
    assert [s.row_groups for s in sources] == [(i, i + 1) for i in range(9)]
    assert len({s.stem for s in sources}) == 9 and sources[2].stem == "docs.rg00002-00002"
    assert [t for s in sources for t in iter_texts(s)] == [r["text"] for r in _docs()]
    whole = tokenize_corpus(formats["jsonl"], str(tokenizer_dir), str(tmp_path / "whole"), show_progress=False)
    monkeypatch.setattr(readers, "DEFAULT_TASK_BYTES", 1)
    parts = tmp_path / "split.parts"
    with pytest.raises(HibariError):  # one range task fails (its part is made unwritable); the others finish
        parts.mkdir()
        (parts / "shard-000004.bin").mkdir()
        tokenize_corpus(formats["parquet"], str(tokenizer_dir), str(tmp_path / "split"), workers=1,
                        show_progress=False)
    done = sorted(p.name for p in (parts / "done").iterdir())
    assert len(done) == 8 and "shard-000004.json" not in done
    (parts / "shard-000004.bin").rmdir()
    split = tokenize_corpus(formats["parquet"], str(tokenizer_dir), str(tmp_path / "split"), workers=2,
                            show_progress=False)
    assert split["shards"] == 9 and split["documents"] == whole["documents"]
    assert (tmp_path / "split.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    assert (tmp_path / "split.idx").read_bytes() == (tmp_path / "whole.idx").read_bytes()


def test_saved_dataset_dict_needs_split_and_other_input_errors(tmp_path, capsys):
    formats = _write_formats(tmp_path, _docs()[:5])
    with pytest.raises(HibariError, match=r"DatasetDict with splits train, test; choose one with --split"):
        resolve_inputs(formats["dict"][:1])
    with pytest.raises(HibariError, match=r"--split 'valid': not in .*saved_dict \(splits: train, test\)"):
        resolve_inputs(formats["dict"][:1], split="valid")
    assert [s.key for s in resolve_inputs(formats["dict"][:1], split="test")] == \
        ["saved_dict/test/data-00000-of-00001.arrow"]
    with pytest.raises(HibariError, match=r"looks like a Hugging Face Hub dataset name.*download it first"):
        resolve_inputs(["HuggingFaceFW/fineweb-edu"])
    with pytest.raises(HibariError, match=r"docs\.parquet: no column 'body' \(columns: id, text, snapshot\)"):
        list(iter_texts(resolve_inputs(formats["parquet"])[0], "body"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "docs.jsonl.zst").write_bytes((tmp_path / "docs.jsonl.zst").read_bytes())
    with pytest.raises(HibariError, match=r"inputs .*docs\.jsonl\.zst and .*sub/docs\.jsonl\.zst: both map to"):
        resolve_inputs([formats["jsonl"][0], str(tmp_path / "sub" / "docs.jsonl.zst")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(HibariError, match=r"notes\.csv: unsupported format"):
        resolve_inputs([str(tmp_path / "notes.csv")])
    # a directory scan skips stage state (`_*`, `.*`) and unrelated files
    (tmp_path / "sub" / "_dedup").mkdir()
    (tmp_path / "sub" / "_dedup" / "x.jsonl.zst").write_bytes(b"")
    assert [s.key for s in resolve_inputs([str(tmp_path / "sub")])] == ["docs.jsonl.zst"]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "stream"])
def test_cut_columnar_file_is_a_one_line_error(tmp_path, tokenizer_dir, capsys, kind):
    formats = _write_formats(tmp_path, _docs())
    src = Path(formats[kind][0])
    data = src.read_bytes()
    capsys.readouterr()  # drop the progress output of `datasets`
    for cut in (len(data) // 3, len(data) - 5):
        src.write_bytes(data[:cut])
        rc = hibari(["data", "tokenize", "--input", str(src), "--tokenizer", str(tokenizer_dir), "--output",
                     str(tmp_path / f"o{cut}")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("hibari: error: ") and src.name in err, err
        assert "Traceback" not in err and "truncated" in err


def test_input_is_repeatable_and_takes_several_paths_in_every_command():
    from launch.cli import build_parser

    parser = build_parser()
    for argv in (["data", "tokenize", "--tokenizer", "t", "--output", "o"],
                 ["tokenizer", "train", "--vocab-size", "300", "--out", "o"],
                 ["corpus", "dedup", "--output", "o"],
                 ["corpus", "annotate", "--output", "o"],
                 ["corpus", "clean", "--output", "o"],
                 ["corpus", "export", "--out", "o"]):
        args = parser.parse_args(argv + ["--input", "a", "b*", "--input", "c"])
        assert args.input == ["a", "b*", "c"], argv


def test_tokenizer_train_reads_text_and_parquet_like_jsonl(tmp_path, capsys):
    """`tokenizer train` and `data tokenize` share the reader: the same documents as .txt (one per line), JSONL
    and parquet train the same model."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sentencepiece as spm

    texts = english_lines(120, seed=5)
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet", row_group_size=50)
    models = []
    for name, extra in (("d.txt", []), ("d.jsonl", []), ("d.parquet", ["--text-key", "body"])):
        rc = hibari(["tokenizer", "train", "--input", str(tmp_path / name), *extra, "--vocab-size", "400",
                     "--out", str(tmp_path / f"tok-{name}"), "--threads", "1"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert "120 documents" in out.out
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / f"tok-{name}" / "tokenizer.model"))
        models.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    # pieces and scores (the file also records its temporary training path, so its bytes differ)
    assert len(models[0]) == 400 and models[0] == models[1] == models[2]


def test_dedup_and_annotate_read_parquet_and_saved_datasets(tmp_path):
    """dedup over a parquet file + a saved dataset decides exactly as over the same records in JSONL shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.corpus.annotate import annotate_file
    from data_pipeline.corpus.config import AnnotateConfig
    from data_pipeline.dedup.pipeline import DedupConfig, run_dedup
    from hibari.io import write_jsonl

    recs = _docs()
    recs.append({**recs[3], "id": "copy"})  # an exact copy, in the parquet file only
    _write_formats(tmp_path, _docs())
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "docs.parquet", row_group_size=7)
    (tmp_path / "as_jsonl").mkdir()
    write_jsonl(tmp_path / "as_jsonl" / "docs.jsonl.zst", recs)
    write_jsonl(tmp_path / "as_jsonl" / "saved.jsonl.zst", _docs())
    config = DedupConfig(bands=9, rows=4, plot=False, host_filter=False)
    report = run_dedup([str(tmp_path / "docs.parquet"), str(tmp_path / "saved")], tmp_path / "dedup", config,
                       show_progress=False)
    oracle = run_dedup(tmp_path / "as_jsonl", tmp_path / "dedup_jsonl", config, show_progress=False)
    assert report["docs_in"] == 121 and report["invalid_passed_through"] == 2  # the two null texts
    assert report["dup_removed"] == oracle["dup_removed"] > 60 - 1  # every saved-dataset doc has a copy
    kept = sorted(r["id"] for p in (tmp_path / "dedup").rglob("*.jsonl.zst") if "_dedup" not in p.parts
                  for r in read_jsonl(p))
    assert kept == sorted(r["id"] for p in (tmp_path / "dedup_jsonl").glob("*.jsonl.zst") for r in read_jsonl(p))
    out_names = sorted(p.relative_to(tmp_path / "dedup").as_posix() for p in (tmp_path / "dedup").rglob("*.jsonl.zst")
                       if "_dedup" not in p.parts)
    assert out_names == ["docs.jsonl.zst"] + [f"saved/data-0000{i}-of-00003.jsonl.zst" for i in range(3)]
    counts = annotate_file([str(tmp_path / "docs.parquet")], str(tmp_path / "ann.jsonl"),
                           AnnotateConfig(ngword={"enabled": False}), show_progress=False)
    assert counts["records"] == 61 and counts["no_text_field"] == 1
    assert [r["id"] for r in read_jsonl(tmp_path / "ann.jsonl")] == [r["id"] for r in recs]
