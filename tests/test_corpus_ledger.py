"""`corpus clean` accountability: the drop ledger (read == kept + dropped per shard, on the real WARC samples),
`corpus explain`, funnel examples, no stale results (refused reruns, --overwrite), hostile pages (decompression
bombs, bad URLs) and `tokenizer train|expand` refusing a non-empty --out."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard

from corpus_warc_fixtures import article_html, http_response, write_warc
from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.ledger import explain, ledger_path
from data_pipeline.corpus.pipeline import run_clean
from data_pipeline.corpus.warc import content_decode, host_of
from hibari.errors import HibariError
from hibari.io import read_jsonl
from test_corpus_clean import html_block, mixed_pages

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REAL_WARCS = sorted(p for d in ("ja-warc-assembled", "ja-warc-real", "warc-samples") for p in (SHARED / d).rglob("*")
                    if p.is_file() and ".warc" in p.name or p.name.endswith((".arc", ".arc.gz")))


def hibari(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=REPO, capture_output=True, text=True)


def check_accounting(out: Path, report: dict) -> int:
    """Per shard: records read == kept + dropped, one ledger line per dropped record, no id lost or doubled."""
    for shard in report["per_shard"]:
        kept = list(read_jsonl(out / shard["output"]))
        ledger = list(read_jsonl(out / shard["ledger"]))
        assert shard["records_read"] == shard["written"] + shard["dropped"], shard
        assert (len(kept), len(ledger)) == (shard["written"], shard["dropped"]), shard
        assert all(e["stage"] and e["reason"] and e["warc_file"] == shard["warc_file"] for e in ledger)
    assert report["records_read"] == report["documents_written"] + report["documents_dropped"]
    return report["records_read"]


@pytest.mark.skipif(len(REAL_WARCS) < 10, reason="shared/data WARC samples not present")
def test_ledger_accounts_for_every_record_of_the_real_samples(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, p in enumerate(REAL_WARCS):  # unique names: several samples share a stem (x.warc, x.warc.gz, x.arc.gz)
        (inputs / f"{i:02d}__{p.name}").symlink_to(p)
    cfg = CleanConfig.model_validate({"extract": {"extractor": "resiliparse"}})
    report = run_clean(str(inputs / "*"), str(tmp_path / "out"), cfg, show_progress=False)
    assert report["shards"] == len(REAL_WARCS) and not report["internal_errors"]
    assert check_accounting(tmp_path / "out", report) >= 49 + 29 + 16
    ledger = [e for p in sorted((tmp_path / "out" / "_ledger").iterdir()) for e in read_jsonl(p)]
    stages = {e["stage"] for e in ledger}
    assert {"read", "http", "url_blocklist", "rapid_ja"} <= stages
    # damaged files: a cut record is a counted `truncated_record` (in the ledger), a file that stops parsing is a
    # listed read error (ARC files are not WARC), never a crash
    assert report["stages"][0]["drops"] == {"truncated_record": 1}
    assert [e for e in ledger if e["reason"] == "truncated_record"][0]["warc_file"].endswith("__clipped.warc.gz")
    errors = {e["warc_file"].split("__", 1)[1]: e["message"] for e in report["read_errors"]}
    assert "WARC header" in errors["example-trunc.warc"] and "WARC header" in errors["example.arc.gz"]
    assert errors["block-sized-records.warc.gz"].startswith("no response or warcinfo record")  # 'unknown' types
    asahi = explain(tmp_path / "out", url="http://www.asahi.com/articles/ASM2Q5HKNM2QUCVL02D.html")
    assert asahi and asahi[0]["fate"] in ("kept", "dropped")


def test_ledger_values_explain_and_funnel_examples(tmp_path):
    custom = tmp_path / "custom-hosts.txt"
    custom.write_text("blocked.example.jp\n", encoding="utf-8")
    cfg = CleanConfig.model_validate({"blocklist": {"custom_lists": [str(custom)]}})
    warc = write_warc(tmp_path / "CC-MAIN-test-00001.warc.gz", mixed_pages())
    out = tmp_path / "out"
    report = run_clean(str(warc), str(out), cfg, show_progress=False, keep_dropped_text=True)
    assert check_accounting(out, report) == 13
    ledger = {e["url"]: e for e in read_jsonl(ledger_path(out, "CC-MAIN-test-00001"))}
    assert len(ledger) == 10
    assert ledger["https://img.example.jp/a.png"] | {"text": None} == {
        "id": ledger["https://img.example.jp/a.png"]["id"], "url": "https://img.example.jp/a.png",
        "snapshot": "CC-MAIN-2024-10", "warc_file": warc.name, "stage": "http", "reason": "not_html",
        "value": "content_type=image/png", "text": None}
    assert ledger["https://news.example.jp/missing"]["value"] == "status=404"
    assert ledger["https://hayabusa.5ch.net/test/1"]["reason"] == "host:*.5ch.net"
    spam = ledger["https://shop.example.jp/sale"]
    assert spam["stage"] == "quality" and spam["text"].startswith("激安セール")  # --keep-dropped-text
    name, op_threshold = spam["reason"].split("<" if "<" in spam["reason"] else ">", 1)
    assert spam["value"].startswith(f"{name}=") and spam["value"].endswith(op_threshold)
    assert ledger["https://en.example.com/library"]["value"].startswith("title='City library reopens' lang=en")
    # report: per-reason example URLs in report.json and report.md
    assert report["drop_examples"]["http/not_html"] == ["https://img.example.jp/a.png"]
    assert "| http/not_html | 1 | https://img.example.jp/a.png |" in (out / "report.md").read_text()
    # hibari corpus explain, both ways, kept and dropped
    r = hibari("corpus", "explain", str(out), "--url", "https://shop.example.jp/sale")
    assert r.returncode == 0 and f"dropped at stage quality: {spam['reason']} ({spam['value']})" in r.stdout
    kept_id = next(read_jsonl(out / "CC-MAIN-test-00001.jsonl.zst"))["id"]
    r = hibari("corpus", "explain", str(out), "--id", kept_id)
    assert r.returncode == 0 and "https://news.example.jp/tea: kept in" in r.stdout
    r = hibari("corpus", "explain", str(out), "--url", "https://nowhere.example.jp/")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no record with url" in r.stderr


def test_rerun_with_other_inputs_or_config_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "in").mkdir()
    page = [("https://news.example.jp/tea", html_block(article_html("tea")))]
    a = write_warc(tmp_path / "in" / "a.warc.gz", page)
    b = write_warc(tmp_path / "in" / "b.warc.gz", page + [("https://x.example.jp/", html_block("<p>x</p>"))])
    out = tmp_path / "out"
    run_clean(str(a), str(out), CleanConfig(), show_progress=False)
    marker = out / ".state" / "done" / "a.json"
    before = marker.read_bytes()
    run_clean(str(a), str(out), CleanConfig(), show_progress=False)  # same run: nothing redone
    assert marker.read_bytes() == before
    other = CleanConfig.model_validate({"quality": {"enabled": False}})
    with pytest.raises(HibariError, match=r"holds results of a different run \(config quality\.enabled: true -> "
                                          r"false\); use --overwrite"):
        run_clean(str(a), str(out), other, show_progress=False)
    with pytest.raises(HibariError, match="input b.warc.gz added"):
        run_clean(str(tmp_path / "in" / "*.warc.gz"), str(out), CleanConfig(), show_progress=False)
    with pytest.raises(HibariError, match=r"\(input b\.warc\.gz added; input a\.warc\.gz removed\)"):
        run_clean(str(b), str(out), CleanConfig(), show_progress=False)
    write_warc(a, page + page)  # same path, new content
    with pytest.raises(HibariError, match=r"input a\.warc\.gz modified"):
        run_clean(str(a), str(out), CleanConfig(), show_progress=False)
    report = run_clean(str(b), str(out), CleanConfig(), show_progress=False, overwrite=True)
    assert report["shards"] == 1 and not (out / "a.jsonl.zst").exists() and (out / "b.jsonl.zst").exists()
    assert sorted(p.name for p in (out / "_ledger").iterdir()) == ["b.dropped.jsonl.zst"]
    assert json.loads((out / ".state" / "run.json").read_text())["inputs"][0]["path"] == str(b.resolve())
    # a directory with shards but no record of how they were made is not silently reused
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "a.jsonl.zst").write_bytes(b"")
    with pytest.raises(HibariError, match="without a record of their inputs"):
        run_clean(str(a), str(legacy), CleanConfig(), show_progress=False)
    assert not list(out.rglob("*.tmp-*"))


def test_decompression_bombs_are_capped_and_counted(tmp_path):
    cap = 1_000_000
    zeros = b"\0" * (64 << 20)  # 64 MB of zeros: ~65 KB gzip, ~2 KB zstd
    bombs = {"gzip": gzip.compress(zeros, 9), "deflate": zlib.compress(zeros, 9),
             "zstd": zstandard.ZstdCompressor(level=19).compress(zeros)}
    for encoding, body in bombs.items():
        tracemalloc.start()
        assert content_decode(body, {"content-encoding": encoding}, cap) is None, encoding
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * cap, (encoding, peak)  # bounded by the cap, not by the 64 MB the body expands to
    small = gzip.compress(b"<html>ok</html>")
    assert content_decode(small + small, {"content-encoding": "gzip"}, cap) == b"<html>ok</html>" * 2
    assert content_decode(b"\x1f\x8bnot gzip", {"content-encoding": "gzip"}, cap) == b"\x1f\x8bnot gzip"
    pages = [(f"https://bomb.example.jp/{enc}", http_response(body, extra_headers=(
        b"Content-Encoding: " + enc.encode(),))) for enc, body in bombs.items()]
    pages.append(("https://news.example.jp/tea", html_block(article_html("tea"))))
    warc = write_warc(tmp_path / "bombs.warc.gz", pages)
    cfg = CleanConfig.model_validate({"read": {"max_page_bytes": cap}})
    report = run_clean(str(warc), str(tmp_path / "out"), cfg, show_progress=False)
    http = next(s for s in report["stages"] if s["name"] == "http")
    assert http["drops"] == {"huge_page": 3} and report["documents_written"] == 1
    values = [e["value"] for e in read_jsonl(ledger_path(tmp_path / "out", "bombs"))]
    assert all(f"body > {cap} bytes" in v for v in values)


BAD_URLS = ["http://../x", "http://a b.example.jp/", "http:///nohost", "dns:www.example.jp", "http://a..b.jp/",
            "http://.example.jp/", "ftp://example.jp/file", "http://exa<mple.jp/", "", "http://" + "a" * 64 + ".jp/"]


def test_bad_urls_are_counted(tmp_path):
    assert [host_of(u) for u in BAD_URLS] == [""] * len(BAD_URLS)
    assert host_of("https://Example.JP./a?b") == "example.jp" and host_of("http://[::1]:8080/") == "::1"
    assert host_of("http://日本語.jp/") == "日本語.jp"
    pages = [(u, html_block(article_html("tea"))) for u in BAD_URLS]
    pages.append(("https://news.example.jp/tea", html_block(article_html("tea"))))
    warc = write_warc(tmp_path / "urls.warc.gz", pages)
    cfg = CleanConfig.model_validate({"blocklist": {"enabled": False}})  # validated even without block lists
    report = run_clean(str(warc), str(tmp_path / "out"), cfg, show_progress=False)
    stage = next(s for s in report["stages"] if s["name"] == "url_blocklist")
    assert stage["drops"] == {"bad_url": len(BAD_URLS)} and report["documents_written"] == 1
    check_accounting(tmp_path / "out", report)


def test_tokenizer_commands_refuse_a_non_empty_out(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"earlier tokenizer")
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "こんにちは"}\n', encoding="utf-8")
    for argv in (["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(out)],
                 ["tokenizer", "expand", "--base", str(out), "--add", str(out), "--out", str(out)]):
        r = hibari(*argv)
        assert r.returncode == 2 and r.stderr.strip() == (f"hibari: error: --out {out}: not empty (it would be "
                                                          "replaced); use --overwrite or another --out"), r.stderr
    assert (out / "tokenizer.model").read_bytes() == b"earlier tokenizer"
