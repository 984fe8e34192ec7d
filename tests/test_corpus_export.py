"""`hibari corpus export`: parquet shards / save_to_disk datasets that `datasets` loads without custom code, the
dataset card built from real stage reports, and the same tokens as the JSONL it came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import make_base_tokenizer  # noqa: E402

from data_pipeline.corpus.annotate import annotate_file  # noqa: E402
from data_pipeline.corpus.config import AnnotateConfig  # noqa: E402
from data_pipeline.dedup.pipeline import DedupConfig, run_dedup  # noqa: E402
from hibari.errors import HibariError  # noqa: E402
from hibari.io import read_jsonl, write_jsonl  # noqa: E402
from launch.cli import main as hibari  # noqa: E402

REAL_JSONL = Path(__file__).resolve().parents[2] / "shared/data/ja-web-text/fineweb2-edu-japanese-100/" \
                                                  "fineweb_100_samples.jsonl"
SNAPSHOTS = ("CC-MAIN-2024-10", "CC-MAIN-2024-18")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Real documents through the real stages: 'clean' shards of two snapshots (with a copied document, so dedup
    removes something) + a clean report, `corpus dedup`, then `corpus annotate` of the dedup output."""
    if not REAL_JSONL.is_file():
        pytest.skip(f"shared sample data not present ({REAL_JSONL})")
    root = tmp_path_factory.mktemp("stages")
    texts = [r["text"] for r in read_jsonl(REAL_JSONL)]
    clean = root / "clean"
    clean.mkdir()
    for s, snap in enumerate(SNAPSHOTS):
        recs = [{"id": f"{snap}-{i}", "text": t, "url": f"https://site{i % 7}.jp/{s}/{i}", "host": f"site{i % 7}.jp",
                 "date": f"2024-0{3 + 2 * s}-01T00:00:00Z", "snapshot": snap, "warc_file": f"{snap}-00000.warc.gz"}
                for i, t in enumerate(texts[s * 50:(s + 1) * 50] + ([texts[0]] if s else []))]
        write_jsonl(clean / f"{snap}.jsonl.zst", recs)
    # the report corpus clean writes (data_pipeline.corpus.pipeline.write_report), for these 101 documents
    (clean / "report.json").write_text(json.dumps({
        "shards": 2, "documents_written": 101, "drop_reasons": {"quality/too_few_letters": 21},
        "stages": [{"name": "read", "pages_in": 122, "pages_out": 122},
                   {"name": "quality", "pages_in": 122, "pages_out": 101}]}), encoding="utf-8")
    dedup = root / "dedup"
    run_dedup(clean, dedup, DedupConfig(bands=9, rows=4, plot=False, host_filter=False), show_progress=False)
    annotated = root / "annotated"
    annotated.mkdir()
    for shard in sorted(dedup.glob("*.jsonl.zst")):
        annotate_file(str(shard), str(annotated / shard.name), AnnotateConfig(ngword={"enabled": False}),
                      show_progress=False)
    return {"clean": clean, "dedup": dedup, "annotated": annotated}


def _expected(stages) -> list[dict]:
    return [r for p in sorted(stages["annotated"].glob("*.jsonl.zst")) for r in read_jsonl(p)]


def test_parquet_export_loads_with_datasets_and_card_has_stage_facts(stages, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "export"
    rc = hibari(["corpus", "export", "--format", "parquet", "--input", str(stages["annotated"]), "--out", str(out),
                 "--reports", str(stages["dedup"]), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    expected = _expected(stages)
    assert len(expected) == 100  # 101 documents, the copy removed by dedup
    for ds in (datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                     cache_dir=str(tmp_path / "cache")),
               datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))):
        assert ds.num_rows == 100
        assert ds["text"] == [r["text"] for r in expected]
        assert ds["url"] == [r["url"] for r in expected] and ds["snapshot"] == [r["snapshot"] for r in expected]
        assert ds["date"][0] == expected[0]["date"] and ds["keep"] == [r["keep"] for r in expected]
        feature = next(iter(expected[0]["features"]))
        assert ds[f"quality_{feature}"] == pytest.approx([float(r["features"][feature]) for r in expected])
        assert ds["reasons"] == [r["reasons"] for r in expected]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| CC-MAIN-2024-10 | 49 |" in card and "| CC-MAIN-2024-18 | 51 |" in card  # keep newest
    assert "character 5-grams, 9 bands x 4 rows" in card and "| 101 | 1 | 0 | 100 |" in card  # dedup report
    assert "quality/too_few_letters: 21" in card and "| quality | 122 | 101 |" in card  # clean report
    summary = json.loads((out / "export.json").read_text(encoding="utf-8"))
    assert summary["documents"] == 100 and summary["fields_not_exported"] == {}
    # the same export again is a no-op; other inputs into it are refused naming the change, --overwrite replaces
    # it; no temporary directory is left behind
    mtime = (out / "export.json").stat().st_mtime_ns
    assert hibari(["corpus", "export", "--format", "parquet", "--input", str(stages["annotated"]), "--out", str(out),
                   "--reports", str(stages["dedup"]), "--quiet"]) == 0
    assert "already done" in capsys.readouterr().out and (out / "export.json").stat().st_mtime_ns == mtime
    rc = hibari(["corpus", "export", "--input", str(stages["dedup"]), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds results of a different run (input" in err and "added" in err and "--overwrite" in err
    assert hibari(["corpus", "export", "--input", str(stages["dedup"]), "--out", str(out), "--overwrite",
                   "--quiet"]) == 0
    assert "keep" not in datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                               cache_dir=str(tmp_path / "cache3")).column_names
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_hf_export_loads_from_disk_and_tokenizes_like_the_jsonl(stages, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert hibari(["corpus", "export", "--format", "hf", "--input", str(stages["dedup"]), "--out", str(out),
                   "--quiet"]) == 0
    ds = datasets.load_from_disk(str(out))
    expected = [r for p in sorted(stages["dedup"].glob("*.jsonl.zst")) for r in read_jsonl(p)]
    assert ds.num_rows == 100 and ds["id"] == [r["id"] for r in expected]
    assert "No `corpus dedup` report" not in (out / "README.md").read_text(encoding="utf-8")
    tok = make_base_tokenizer(tmp_path / "tok")
    for name, inp in (("jsonl", stages["dedup"]), ("hf", out)):
        assert hibari(["data", "tokenize", "--input", str(inp), "--tokenizer", str(tok), "--output",
                       str(tmp_path / f"tokens-{name}"), "--workers", "1"]) == 0
    assert (tmp_path / "tokens-hf.bin").read_bytes() == (tmp_path / "tokens-jsonl.bin").read_bytes()
    assert (tmp_path / "tokens-hf.idx").read_bytes() == (tmp_path / "tokens-jsonl.idx").read_bytes()


def test_fields_outside_the_schema_are_counted_not_dropped_silently(tmp_path):
    from data_pipeline.corpus.export import export_corpus

    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "a", "n": 1}, {"text": "b", "n": "two", "extra": 3}])
    s = export_corpus([str(tmp_path / "in")], tmp_path / "out", show_progress=False)
    assert s["documents"] == 2 and s["fields_not_exported"] == {"extra": 1} and s["values_not_exported"] == {"n": 1}
    assert "Not exported (counted)" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    with pytest.raises(HibariError, match=r"--out .*: must not be an input directory"):
        export_corpus([str(tmp_path / "in")], tmp_path / "in" / "sub", show_progress=False)
