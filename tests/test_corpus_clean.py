"""`hibari corpus clean` / `annotate` end to end on WARC files the tests write, bad input, resumability, and
plausibility on the real samples in ../shared/data (skipped when absent)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corpus_warc_fixtures import (ARTICLES, article_html, boilerplate_html, english_html, http_response, spam_html,
                                  warc_record, write_warc)
from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.pipeline import run_clean
from data_pipeline.corpus.warc import split_http
from hibari.io import read_jsonl, write_jsonl
from hibari.errors import HibariError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SCHEMA = ["id", "text", "url", "host", "date", "snapshot", "warc_file"]


def html_block(html: str, **kw) -> bytes:
    return http_response(html.encode("utf-8"), **kw)


def mixed_pages() -> list[tuple[str, bytes]]:
    custom = "https://blocked.example.jp/a"
    return [
        ("https://news.example.jp/tea", html_block(article_html("tea"))),
        ("https://example.jp/sitemap", html_block(boilerplate_html())),
        ("https://shop.example.jp/sale", html_block(spam_html())),
        ("https://en.example.com/library", html_block(english_html())),
        ("https://hayabusa.5ch.net/test/1", html_block(article_html("library"))),
        ("https://ja.wikipedia.org/wiki/X", html_block(article_html("bread"))),
        (custom, html_block(article_html("bread"))),
        ("https://img.example.jp/a.png", http_response(b"\x89PNG....", content_type="image/png")),
        ("https://news.example.jp/missing", html_block("<html lang=ja><title>無い</title></html>", status=404)),
        ("https://empty.example.jp/", http_response(b"   ", content_type="text/html")),
        # CP932 page without any charset label, and a bare-\n HTTP header (the ClueWeb quirk)
        ("https://sjis.example.jp/bread", http_response(article_html("bread").replace('<meta charset="utf-8">', "")
                                                        .encode("cp932"), content_type="text/html", eol=b"\n")),
        ("https://bad.example.jp/", http_response(b"<p>" + b"\x81\x20" * 50, content_type="text/html")),
        ("https://news.example.jp/library", html_block(article_html("library"))),
    ]


@pytest.fixture()
def cfg(tmp_path) -> CleanConfig:
    custom = tmp_path / "custom-hosts.txt"
    custom.write_text("# test list\nblocked.example.jp\n", encoding="utf-8")
    return CleanConfig.model_validate({"blocklist": {"custom_lists": [str(custom)]}})


def read_shard(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def test_end_to_end_exact_survivors(tmp_path, cfg):
    (tmp_path / "in").mkdir()
    warc = write_warc(tmp_path / "in" / "CC-MAIN-test-00001.warc.gz", mixed_pages())
    out = tmp_path / "out"
    report = run_clean(str(warc), str(out), cfg, show_progress=False)
    docs = read_shard(out / "CC-MAIN-test-00001.jsonl.zst")
    assert [d["url"] for d in docs] == ["https://news.example.jp/tea", "https://sjis.example.jp/bread",
                                        "https://news.example.jp/library"]
    for d in docs:
        assert list(d) == SCHEMA
        assert d["snapshot"] == "CC-MAIN-2024-10" and d["warc_file"] == warc.name
        assert d["date"] == "2024-03-01T12:00:00+00:00" and d["host"] == d["url"].split("/")[2]
        assert d["id"].startswith("<urn:uuid:")
        assert "Copyright" not in d["text"] and "トップ" not in d["text"]
    assert "パン屋" in docs[1]["text"]  # CP932 decoded, payload after the bare-\n header kept
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["read"]["pages_in"] == 13
    assert stages["http"]["drops"] == {"not_html": 1, "http_status_4xx": 1, "empty_payload": 1}
    assert stages["url_blocklist"]["drops"] == {"host:*.5ch.net": 1, "host:*wikipedia.org": 1, "custom": 1}
    assert stages["decode"]["drops"] == {"undecodable": 1}
    assert stages["rapid_ja"]["drops"] == {"title_not_japanese": 1}
    assert sum(stages["quality"]["drops"].values()) == 2  # boilerplate + spam
    assert report["documents_written"] == 3
    assert sum(sum(s["drops"].values()) for s in report["stages"]) + 3 == 13  # every page accounted for
    assert (out / "report.md").is_file() and (out / "funnel.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["drop_reasons"]["rapid_ja/title_not_japanese"] == 1


def test_output_loads_with_datasets(tmp_path, cfg):
    datasets = pytest.importorskip("datasets", reason="datasets not installed")
    warc = write_warc(tmp_path / "a.warc.gz", mixed_pages())
    run_clean(str(warc), str(tmp_path / "out"), cfg, show_progress=False)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "out" / "a.jsonl.zst"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 3 and set(SCHEMA) <= set(ds.column_names)


def test_bad_files_are_counted_not_crashed(tmp_path, cfg):
    good = [("https://news.example.jp/tea", html_block(article_html("tea"))),
            ("https://news.example.jp/library", html_block(article_html("library")))]
    full = write_warc(tmp_path / "full.warc.gz", good).read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "truncated.warc.gz").write_bytes(full[: len(full) - 300])
    raw = gzip.decompress(full)
    second = raw.index(b"WARC/1.1", raw.index(b"WARC-Type: response"))
    corrupt = raw[:second] + raw[second:].replace(b"WARC/1.1", b"WARX/9.9", 1)
    (tmp_path / "in" / "corrupt.warc").write_bytes(corrupt)
    huge = [("https://big.example.jp/", html_block(article_html("tea") + "<!--" + "x" * 300_000 + "-->"))]
    write_warc(tmp_path / "in" / "huge.warc.gz", huge + good[:1])
    cfg.read.max_page_bytes = 100_000
    report = run_clean(str(tmp_path / "in" / "*"), str(tmp_path / "out"), cfg, show_progress=False)
    per = {s["warc_file"]: s for s in report["per_shard"]}
    assert set(per) == {"truncated.warc.gz", "corrupt.warc", "huge.warc.gz"}
    assert per["huge.warc.gz"]["written"] == 1
    assert report["stages"][0]["drops"]["huge_page"] == 1
    # the truncated file: the first article survives, the cut one is a counted truncated record / read error
    assert per["truncated.warc.gz"]["written"] == 1
    assert report["stages"][0]["drops"].get("truncated_record", 0) + len(report["read_errors"]) >= 1
    assert per["corrupt.warc"]["written"] == 1
    assert any(e["warc_file"] == "corrupt.warc" for e in report["read_errors"])
    assert not list((tmp_path / "out").glob(".*.tmp-*"))


def test_errors_before_start(tmp_path, cfg):
    with pytest.raises(HibariError, match="no such file"):
        run_clean(str(tmp_path / "nothing-*.warc.gz"), str(tmp_path / "out"), cfg, show_progress=False)
    warc = write_warc(tmp_path / "a.warc.gz", mixed_pages()[:1])
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(HibariError, match="output dir"):
        run_clean(str(warc), str(blocker / "sub"), cfg, show_progress=False)
    # two inputs that map to one output / task id: one line naming both (a file named twice is one input)
    (tmp_path / "other").mkdir()
    twin = write_warc(tmp_path / "other" / "a.warc", mixed_pages()[:1], gz=False)
    with pytest.raises(HibariError, match=r"inputs .*a\.warc\.gz and .*other/a\.warc map to the same output a\.jsonl"):
        run_clean([str(warc), str(twin)], str(tmp_path / "out"), cfg, show_progress=False)
    assert not (tmp_path / "out" / ".state").exists()
    cfg.ngword.paths = [str(tmp_path / "missing-ng.txt")]
    with pytest.raises(HibariError, match="ngword.paths"):
        run_clean(str(warc), str(tmp_path / "out"), cfg, show_progress=False)


def test_snapshot_option_and_fallbacks(tmp_path, cfg):
    page = [("https://news.example.jp/tea", html_block(article_html("tea")))]
    (tmp_path / "in").mkdir()
    write_warc(tmp_path / "in" / "x.warc.gz", page, snapshot=None)
    write_warc(tmp_path / "in" / "CC-MAIN-2023-23-part.warc.gz", page, snapshot=None)
    run_clean(str(tmp_path / "in" / "*.warc.gz"), str(tmp_path / "o1"), cfg, show_progress=False)
    assert read_shard(tmp_path / "o1" / "x.jsonl.zst")[0]["snapshot"] == "unknown"
    assert read_shard(tmp_path / "o1" / "CC-MAIN-2023-23-part.jsonl.zst")[0]["snapshot"] == "CC-MAIN-2023-23"
    cfg.snapshot = "my-crawl"
    run_clean(str(tmp_path / "in" / "x.warc.gz"), str(tmp_path / "o2"), cfg, show_progress=False)
    assert read_shard(tmp_path / "o2" / "x.jsonl.zst")[0]["snapshot"] == "my-crawl"


def test_bare_lf_http_header_split():
    block = b"HTTP/1.1 200 OK\nContent-Type: text/html\n\n<html>\r\n\r\n<p>x</p></html>"
    status, headers, payload = split_http(block)
    assert status == 200 and headers == {"content-type": "text/html"}
    assert payload == b"<html>\r\n\r\n<p>x</p></html>"


@pytest.mark.skipif(not (SHARED / "ja-warc-real" / "clueweb09-ja-quirk.warc.gz").is_file(),
                    reason="shared/data/ja-warc-real not present")
def test_clueweb_quirk_no_payload_lost(tmp_path):
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    path = SHARED / "ja-warc-real" / "clueweb09-ja-quirk.warc.gz"
    ours = fastwarc_http = 0
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f, parse_http=False, record_types=WarcRecordType.response):
            status, headers, payload = split_http(rec.reader.read())
            assert status == 200 and not any("<" in k for k in headers)
            assert payload.lstrip()[:1] == b"<"
            ours += len(payload)
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f, parse_http=True, record_types=WarcRecordType.response):
            fastwarc_http += len(rec.reader.read())
    assert ours == 911_605  # 29 EUC-JP pages, all payload bytes
    assert fastwarc_http < ours - 200_000  # fastwarc's own HTTP parsing loses ~296 KB here
    cfg = CleanConfig.model_validate({"extract": {"extractor": "resiliparse"}})
    report = run_clean(str(path), str(tmp_path / "out"), cfg, show_progress=False)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["read"]["pages_in"] == 29 and stages["rapid_ja"]["pages_out"] == 29
    assert stages["http"]["chars_out"] == 911_605


@pytest.mark.skipif(not (SHARED / "ja-warc-assembled" / "records.jsonl").is_file(),
                    reason="shared/data/ja-warc-assembled not present")
def test_real_samples_funnel_is_plausible(tmp_path):
    src = SHARED / "ja-warc-assembled"
    expected = {json.loads(l)["url"]: json.loads(l)["expected_is_japanese"]
                for l in (src / "records.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()}
    cfg = CleanConfig()  # trafilatura: resiliparse's main-content text keeps menus, most pages then fail quality
    report = run_clean(str(src / "ja-html-assembled.warc.gz"), str(tmp_path / "out"), cfg, show_progress=False)
    docs = read_shard(tmp_path / "out" / "ja-html-assembled.jsonl.zst")
    urls = {d["url"] for d in docs}
    assert all(expected[u] for u in urls)  # no non-Japanese negative survives
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["read"]["pages_in"] == 49
    assert stages["language"]["pages_out"] >= 33  # of 39 Japanese pages (rapid check misses ~3, as expected)
    assert len(docs) >= 10


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_kill_and_resume_gives_identical_output(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    keys = ["tea", "library", "bread"]
    for i in range(6):
        pages = [(f"https://s{i}.example.jp/{j}", html_block(article_html(keys[(i + j) % 3], f"記事{i}-{j}")))
                 for j in range(6)]
        write_warc(inputs / f"shard-{i:02d}.warc.gz", pages)
    args = ["corpus", "clean", "--input", str(inputs / "*.warc.gz"), "--quiet",
            "--set", "extract.extractor=trafilatura"]
    ref = _run_cli(args + ["--output", str(tmp_path / "ref")])
    assert ref.wait(timeout=240) == 0, ref.stderr.read().decode()

    out = tmp_path / "resumed"
    proc = _run_cli(args + ["--output", str(out)])
    done = out / ".state" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("*.json"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    finished_before_kill = len(list(done.glob("*.json")))
    assert proc.returncode == -signal.SIGKILL and finished_before_kill < 6, "run was not interrupted"
    rerun = _run_cli(args + ["--output", str(out)])
    assert rerun.wait(timeout=240) == 0, rerun.stderr.read().decode()
    for i in range(6):
        name = f"shard-{i:02d}.jsonl.zst"
        assert read_shard(out / name) == read_shard(tmp_path / "ref" / name)
    all_ids = [d["id"] for p in sorted(out.glob("*.jsonl.zst")) for d in read_shard(p)]
    assert len(all_ids) == len(set(all_ids)) == 36
    assert not list(out.glob(".*.tmp-*"))
    ref_report = json.loads((tmp_path / "ref" / "report.json").read_text())
    new_report = json.loads((out / "report.json").read_text())
    assert ref_report["stages"] == new_report["stages"]


def test_annotate_cli(tmp_path):
    src = tmp_path / "docs.jsonl.zst"
    good = "\n".join(ARTICLES["tea"])
    write_jsonl(src, [{"id": 1, "text": good}, {"id": 2, "text": "短い。"}, {"id": 3, "body": "no text"}])
    out = tmp_path / "annotated.jsonl"
    proc = _run_cli(["corpus", "annotate", "--input", str(src), "--output", str(out), "--quiet"])
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    recs = list(read_jsonl(out))
    assert [r["keep"] for r in recs] == [True, False, False]
    assert recs[1]["reasons"][0] == "num_letters<400"
    assert recs[2]["reasons"] == ["no_text_field"]
    assert "ng_fraction" in recs[0]["features"] and "duplicate_10gram_character_fraction" in recs[0]["features"]
    bad = _run_cli(["corpus", "annotate", "--input", str(src), "--output", str(out), "--rules", "quality,bogus"])
    assert bad.wait(timeout=120) == 2
    err = bad.stderr.read().decode()
    assert err.startswith("hibari: error: --rules") and "Traceback" not in err


def test_resiliparse_extractor_same_survivors(tmp_path, cfg):
    # resiliparse's blank lines between blocks are collapsed, else they count as duplicate paragraphs
    cfg.extract.extractor = "resiliparse"
    warc = write_warc(tmp_path / "a.warc.gz", mixed_pages())
    run_clean(str(warc), str(tmp_path / "out"), cfg, show_progress=False)
    docs = read_shard(tmp_path / "out" / "a.jsonl.zst")
    assert [d["url"] for d in docs] == ["https://news.example.jp/tea", "https://sjis.example.jp/bread",
                                        "https://news.example.jp/library"]
    assert all("\n\n" not in d["text"] for d in docs)
