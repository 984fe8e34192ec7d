"""Reruns into an existing output (issue 15) for `corpus annotate`, `corpus dedup` and `corpus export`, through the
CLI on files on disk: the same command is a no-op, other inputs / config / models are refused with one line naming
the change, `--overwrite` replaces exactly the earlier results. Also annotate's typed config (issue 13):
`--config FILE --set a.b=v` plus shortcut flags that win and carry no defaults of their own."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_warc_fixtures import ARTICLES, article_html, http_response, write_warc  # noqa: E402

from hibari.io import read_jsonl, write_jsonl  # noqa: E402
from launch.cli import main as hibari  # noqa: E402

FINEWEB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ja-web-text" / "fineweb2-edu-japanese-100" / \
    "fineweb_100_samples.jsonl"


def _docs(n: int) -> list[dict]:
    """Real Japanese web text (FineWeb2-edu sample) when the shared data is there, else the fixture articles."""
    if FINEWEB.is_file():
        texts = [r["text"] for r in read_jsonl(FINEWEB)]
    else:
        texts = ["\n".join(lines) for lines in ARTICLES.values()]
    return [{"id": f"doc-{i}", "text": texts[i % len(texts)] + ("" if i < len(texts) else f"\n{i}"),
             "url": f"https://site{i % 3}.example.jp/{i}", "host": f"site{i % 3}.example.jp",
             "date": "2024-03-01T12:00:00Z", "snapshot": "CC-MAIN-2024-10"} for i in range(n)]


def _error(capsys, argv) -> str:
    rc = hibari(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("hibari: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def _ok(capsys, argv) -> str:
    rc = hibari(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def _later(path: Path, records) -> None:
    """Rewrite `path` with other records, its mtime a second later (coarse file-system clocks)."""
    mtime = path.stat().st_mtime_ns
    write_jsonl(path, records)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def test_annotate_rerun_noop_refusal_and_overwrite(tmp_path, capsys):
    docs = _docs(12)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, docs[:8])
    write_jsonl(b, docs[8:])
    out = tmp_path / "ann.jsonl.zst"
    base = ["corpus", "annotate", "--output", str(out), "--quiet"]
    first = _ok(capsys, base + ["--input", str(a)])
    assert "8 records" in first
    mtime = out.stat().st_mtime_ns
    record = json.loads((tmp_path / "ann.jsonl.zst.run.json").read_text())
    assert record["inputs"][0]["path"] == str(a.resolve()) and record["stats"]["records"] == 8
    # the same command again: nothing is rewritten
    assert "already done" in _ok(capsys, base + ["--input", str(a)]) and out.stat().st_mtime_ns == mtime
    # each kind of change is refused and named; the output stays as it was
    err = _error(capsys, base + ["--input", str(a), str(b)])
    assert "holds results of a different run (input b.jsonl added)" in err and "--overwrite" in err
    assert "config ngword.max_fraction: 0.05 -> 0.1" in _error(capsys, base + ["--input", str(a), "--set",
                                                                                "ngword.max_fraction=0.1"])
    assert "config ngword.enabled: true -> false" in _error(capsys, base + ["--input", str(a), "--no-ngword"])
    assert "options text_key" in _error(capsys, base + ["--input", str(a), "--text-key", "body"])
    _later(a, docs[:9])
    assert "input a.jsonl modified" in _error(capsys, base + ["--input", str(a)])
    assert out.stat().st_mtime_ns == mtime and len(list(read_jsonl(out))) == 8
    # --overwrite replaces it with the new inputs' records
    _ok(capsys, base + ["--input", str(a), str(b), "--overwrite"])
    assert [r["id"] for r in read_jsonl(out)] == [d["id"] for d in docs[:9] + docs[8:]]
    assert "already done" in _ok(capsys, base + ["--input", str(a), str(b)])


def test_annotate_refuses_changed_word_lists_and_unrecorded_outputs(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, _docs(4))
    words = tmp_path / "ng.txt"
    words.write_text("存在しない語\n", encoding="utf-8")
    out = tmp_path / "ann.jsonl"
    argv = ["corpus", "annotate", "--input", str(src), "--output", str(out), "--ng-words", str(words), "--quiet"]
    _ok(capsys, argv)
    words.write_text("存在しない語\nの\n", encoding="utf-8")  # same path, other list: other ng_fraction values
    err = _error(capsys, argv)
    assert f"resources ngword_lists.{words}" in err
    # an output file no hibari run recorded is not replaced silently either
    other = tmp_path / "theirs.jsonl"
    other.write_text('{"text": "someone else\'s file"}\n', encoding="utf-8")
    argv = ["corpus", "annotate", "--input", str(src), "--output", str(other), "--quiet"]
    assert "holds results without a record" in _error(capsys, argv)
    _ok(capsys, argv + ["--overwrite"])
    assert len(list(read_jsonl(other))) == 4
    assert "is also an input" in _error(capsys, ["corpus", "annotate", "--input", str(src), "--output", str(src)])


def test_annotate_config_file_set_and_shortcuts(tmp_path, capsys):
    from data_pipeline.filters import NGWordMatcher, quality_decision, quality_features

    docs = _docs(6) + [{"id": "no-text", "body": "x"}]
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, docs)
    # defaults: the decision of the filters API with the shipped NG lists (the behaviour before the typed config)
    _ok(capsys, ["corpus", "annotate", "--input", str(src), "--output", str(tmp_path / "default.jsonl"), "--quiet"])
    got = list(read_jsonl(tmp_path / "default.jsonl"))
    for doc, rec in zip(docs[:6], got):
        assert (rec["keep"], rec["reasons"]) == quality_decision(quality_features(doc["text"],
                                                                                  NGWordMatcher.default()))
    assert got[-1]["reasons"] == ["no_text_field"]
    # a config file, then --set over it: only the NG-word rule decides, at a threshold every text reaches
    cfg = tmp_path / "annotate.yaml"
    cfg.write_text(yaml.safe_dump({"quality": {"enabled": False}, "ngword": {"max_fraction": 0.5}}))
    out = tmp_path / "ng_only.jsonl"
    _ok(capsys, ["corpus", "annotate", "--input", str(src), "--output", str(out), "--config", str(cfg),
                 "--set", "ngword.max_fraction=0.0", "--quiet"])
    recs = list(read_jsonl(out))
    assert all(r["keep"] is False and r["reasons"] == ["ng_fraction>=0"] for r in recs[:6])
    # a shortcut wins over --set: --rules quality turns the quality rules on and the NG-word features off
    out = tmp_path / "quality_only.jsonl"
    _ok(capsys, ["corpus", "annotate", "--input", str(src), "--output", str(out), "--config", str(cfg),
                 "--set", "quality.enabled=false", "--rules", "quality", "--quiet"])
    recs = list(read_jsonl(out))
    assert all("ng_fraction" not in r["features"] for r in recs[:6])
    for doc, rec in zip(docs[:6], recs):
        assert (rec["keep"], rec["reasons"]) == quality_decision(quality_features(doc["text"]), ("quality",))
    record = json.loads((tmp_path / "quality_only.jsonl.run.json").read_text())
    assert record["config"]["quality"]["enabled"] is True and record["config"]["ngword"]["enabled"] is False
    # bad values: one line naming the flag, the key or the file
    base = ["corpus", "annotate", "--input", str(src), "--output", str(tmp_path / "bad.jsonl")]
    assert "--classifier-threshold:" in _error(capsys, base + ["--classifier-threshold", "2"])
    assert "field ngword.bogus: unknown key" in _error(capsys, base + ["--set", "ngword.bogus=1"])
    assert "--rules ngword needs the NG-word features" in _error(capsys, base + ["--rules", "ngword",
                                                                                  "--no-ngword"])
    assert "ngword.paths: /nonexistent-list: no such file" in _error(capsys, base + ["--ng-words",
                                                                                     "/nonexistent-list"])
    assert not (tmp_path / "bad.jsonl").exists() and not (tmp_path / "bad.jsonl.run.json").exists()


def test_dedup_rerun_noop_refusal_and_overwrite(tmp_path, capsys):
    docs = _docs(30)
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl.zst", docs[:10])
    write_jsonl(inp / "b.jsonl.zst", docs[10:20])
    out = tmp_path / "dedup"
    base = ["corpus", "dedup", "--output", str(out), "--bands", "9", "--rows", "4", "--no-plot", "--quiet"]
    _ok(capsys, base + ["--input", str(inp)])
    marker = out / "_dedup" / "state" / "done" / "sig-a.jsonl.zst.json"
    shard_mtime, marker_mtime = (out / "a.jsonl.zst").stat().st_mtime_ns, marker.stat().st_mtime_ns
    before = {p.name: list(read_jsonl(p)) for p in out.glob("*.jsonl.zst")}
    # the same command again: every task is done, no shard rewritten
    _ok(capsys, base + ["--input", str(inp)])
    assert (out / "a.jsonl.zst").stat().st_mtime_ns == shard_mtime and marker.stat().st_mtime_ns == marker_mtime
    # other inputs or parameters: refused, named; nothing changed
    write_jsonl(inp / "c.jsonl.zst", docs[20:])
    assert "input c.jsonl.zst added" in _error(capsys, base + ["--input", str(inp)])
    (inp / "c.jsonl.zst").unlink()
    assert "config keep: \"newest\" -> \"oldest\"" in _error(capsys, base + ["--input", str(inp), "--keep",
                                                                              "oldest"])
    assert "config bands: 9 -> 10" in _error(capsys, base + ["--input", str(inp), "--bands", "10"])
    _later(inp / "b.jsonl.zst", docs[10:21])
    assert "input b.jsonl.zst modified" in _error(capsys, base + ["--input", str(inp)])
    assert {p.name: list(read_jsonl(p)) for p in out.glob("*.jsonl.zst")} == before
    # --overwrite with other inputs: the earlier run's shard that is no longer an input is gone
    (inp / "b.jsonl.zst").rename(tmp_path / "b.jsonl.zst")
    write_jsonl(inp / "c.jsonl.zst", docs[20:])
    _ok(capsys, base + ["--input", str(inp), "--overwrite"])
    assert sorted(p.name for p in out.glob("*.jsonl.zst")) == ["a.jsonl.zst", "c.jsonl.zst"]
    assert [r["id"] for r in read_jsonl(out / "c.jsonl.zst")] == [d["id"] for d in docs[20:]]
    report = json.loads((out / "_dedup" / "report.json").read_text())
    assert report["docs_in"] == 20
    # an output with dedup state but no record (an older hibari) is refused, not mixed into
    (out / "_dedup" / "state" / "run.json").unlink()
    assert "holds results without a record" in _error(capsys, base + ["--input", str(inp)])


def test_dedup_config_file_and_shortcuts(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl.zst", _docs(5))
    cfg = tmp_path / "dedup.yaml"
    cfg.write_text(yaml.safe_dump({"bands": 7, "rows": 3, "keep": "oldest", "plot": False}))
    out = tmp_path / "out"
    _ok(capsys, ["corpus", "dedup", "--input", str(inp), "--output", str(out), "--config", str(cfg),
                 "--set", "rows=4", "--bands", "9", "--quiet"])
    params = json.loads((out / "_dedup" / "report.json").read_text())["params"]
    assert (params["bands"], params["rows"], params["keep"]) == (9, 4, "oldest")  # flag > --set > file
    err = _error(capsys, ["corpus", "dedup", "--input", str(inp), "--output", str(tmp_path / "o2"), "--config",
                          str(cfg), "--set", "bogus=1"])
    assert f"{cfg}: field bogus: unknown key" in err


def test_export_rerun_noop_refusal_and_overwrite(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl.zst", _docs(6))
    out = tmp_path / "export"
    base = ["corpus", "export", "--input", str(inp), "--out", str(out), "--quiet"]
    _ok(capsys, base)
    mtime = (out / "data" / "train-00000-of-00001.parquet").stat().st_mtime_ns
    assert "already done" in _ok(capsys, base)
    assert (out / "data" / "train-00000-of-00001.parquet").stat().st_mtime_ns == mtime
    assert "options name: \"export\" -> \"ja\"" in _error(capsys, base + ["--name", "ja"])
    _later(inp / "a.jsonl.zst", _docs(7))
    assert "input a.jsonl.zst modified" in _error(capsys, base)
    _ok(capsys, base + ["--overwrite"])
    assert json.loads((out / "export.json").read_text())["documents"] == 7
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not an export")
    assert "holds results without a record" in _error(capsys, ["corpus", "export", "--input", str(inp), "--out",
                                                               str(theirs), "--quiet"])
    assert (theirs / "notes.txt").is_file()


def test_clean_refuses_an_edited_word_list_at_the_same_path(tmp_path, capsys):
    """The clean record holds digests of the lists and models its config names, not only their paths."""
    warc = write_warc(tmp_path / "a.warc.gz", [(f"https://news.example.jp/{k}", http_response(article_html(k).encode()))
                                              for k in ("tea", "library")])
    words = tmp_path / "ng.txt"
    words.write_text("存在しない語\n", encoding="utf-8")
    argv = ["corpus", "clean", "--input", str(warc), "--output", str(tmp_path / "out"), "--quiet",
            "--set", f"ngword.paths=[{words}]"]
    _ok(capsys, argv)
    kept = (tmp_path / "out" / "a.jsonl.zst").read_bytes()
    _ok(capsys, argv)  # unchanged: nothing to do
    words.write_text("".join(chr(c) + "\n" for c in range(0x3041, 0x3097)), encoding="utf-8")  # every hiragana
    assert f"resources ngword_lists.{words}" in _error(capsys, argv)
    assert (tmp_path / "out" / "a.jsonl.zst").read_bytes() == kept and len(list(read_jsonl(tmp_path / "out" /
                                                                                        "a.jsonl.zst"))) == 2
    _ok(capsys, argv + ["--overwrite"])
    assert list(read_jsonl(tmp_path / "out" / "a.jsonl.zst")) == []  # every page is now mostly "NG words"
