"""`extract.extractor` methods (data_pipeline/corpus/extract.py): pre-trim, every method on fixture and real pages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.extract import EXTRACTORS, make_extractor, pretrim_html
from data_pipeline.corpus.steps import Extract
from data_pipeline.corpus.warc import Page, decode_html
from tests.corpus_warc_fixtures import ARTICLES, article_html

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NHK = SHARED / "ja-html" / "trafilatura" / "nhk.or.jp.k100.html"


def test_pretrim_cuts_non_text_elements_and_furigana_only():
    html = ('<html><head><style>p{color:red}</style><script type="x">var a = "<p>no</p>";</script></head><body>'
            '<!-- <p>commented</p> --><noscript>enable JS</noscript><svg><text>icon</text></svg>'
            '<p><ruby>漢字<rt>かんじ</rt></ruby>の<ruby><rb>読</rb><rp>(</rp><rt>よ</rt><rp>)</rp></ruby>み'
            '<ruby>方<rt>かた</ruby>です。</p></body></html>')
    out = pretrim_html(html)
    assert "<p>漢字の読み方です。</p>" in out  # ruby base text joined, readings gone (also with an omitted </rt>)
    for gone in ("color:red", "var a", "commented", "enable JS", "icon", "かんじ", "よ)"):
        assert gone not in out
    unclosed = "<p>本文</p><script>never closed"
    assert pretrim_html(unclosed) == unclosed  # no end tag: nothing is cut (no text can be lost)
    assert pretrim_html("<!-- open <p>本文</p><style>a{}</style>") == "<!-- open <p>本文</p> "
    assert pretrim_html("<SCRIPT src=x></Script ><p>a</p><script>b</script>") == " <p>a</p> "


def test_pretrim_stays_linear_on_hostile_pages():
    # quadratic scanning would take minutes on these (every opening searched to the end of the page)
    for hostile in ("<script>" * 40_000, "<!--" * 40_000, "<rt" * 40_000 + ">", "<ruby" * 40_000):
        out = pretrim_html(hostile + "<p>本文</p>")
        assert out.endswith("<p>本文</p>")


def test_default_and_choices():
    assert CleanConfig().extract.extractor == "trafilatura_pretrim"  # chosen by bench/results/extract_quality.md
    for method in EXTRACTORS:
        assert CleanConfig.model_validate({"extract": {"extractor": method}}).extract.extractor == method
    with pytest.raises(ValidationError):
        CleanConfig.model_validate({"extract": {"extractor": "bogus"}})
    with pytest.raises(ValueError, match="unknown extractor"):
        make_extractor("bogus")


@pytest.mark.parametrize("method", EXTRACTORS)
def test_every_method_extracts_the_article_in_the_clean_step(method):
    cfg = CleanConfig.model_validate({"extract": {"extractor": method}})
    step = Extract(cfg)
    page = Page(id="1", url="https://news.example.jp/tea", host="news.example.jp", date="", snapshot="",
                warc_file="", html=article_html("tea"))
    assert step(page) is page
    lines = page.text.split("\n")
    assert all(paragraph in lines for paragraph in ARTICLES["tea"])  # every paragraph, one per line
    assert "\n\n" not in page.text and "Copyright 2024" not in page.text and "トップ" not in page.text
    assert step.stats()["pages_out"] == 1


@pytest.mark.skipif(not NHK.is_file(), reason="shared/data/ja-html not present")
def test_pretrim_keeps_trafilatura_snippets_and_removes_furigana_from_resiliparse():
    rec = next(json.loads(line) for line in (SHARED / "ja-html" / "index.jsonl").read_text(encoding="utf-8")
               .splitlines() if "nhk.or.jp" in line)
    html = decode_html(NHK.read_bytes(), "")[0]
    text = make_extractor("trafilatura_pretrim")(html)
    assert all(s.strip() in text for s in rec["expected"]["must_contain"])  # trafilatura's own expectations
    assert not any(s.strip() in text for s in rec["expected"]["must_not_contain"])
    assert text == make_extractor("trafilatura_fast")(html)
    # resiliparse alone glues the readings into the sentence; pre-trimmed, the sentence reads as written
    assert "虐待ぎゃくたい" in make_extractor("resiliparse")(html)
    trimmed = make_extractor("resiliparse_pretrim")(html)
    assert "虐待ぎゃくたい" not in trimmed and "子どもへの虐待をなくすための法律ができて" in trimmed


@pytest.mark.skipif(not (SHARED / "ja-html" / "index.jsonl").is_file(), reason="shared/data/ja-html not present")
def test_pretrim_default_matches_plain_trafilatura_on_magic_html_ground_truth():
    """The default gives the text of trafilatura with its fallbacks (the old default) on the human-annotated pages."""
    base = SHARED / "ja-html"
    recs = [json.loads(line) for line in (base / "index.jsonl").read_text(encoding="utf-8").splitlines()
            if '"main_content"' in line]
    assert len(recs) == 7
    old, new = make_extractor("trafilatura"), make_extractor("trafilatura_pretrim")
    for rec in recs:
        html = decode_html((base / rec["file"]).read_bytes(), "")[0]
        text = new(html)
        assert text == old(html)
        flat = "".join(text.split())
        lines = ["".join(line.split()) for line in rec["expected"]["main_content"].split("\n") if line.strip()]
        assert sum(line in flat for line in lines) >= 0.3 * len(lines)  # the annotated main text is what it found
