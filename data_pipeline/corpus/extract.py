"""Main-text extractors of `corpus clean` (config key `extract.extractor`), chosen by measured quality and speed.

Every method takes decoded HTML (str) and returns the main text with one newline between blocks (Swallow's data
and the quality rules count lines as paragraphs, so blank lines would read as duplicate empty paragraphs).
`bench/extract_quality.py` measures main-text F1 against human ground truth and CPU time per page for each method;
bench/results/extract_quality.md holds the numbers the default was chosen by.

- trafilatura: trafilatura with its fallback extractors (readability, jusText) — the setting Swallow-style
  pipelines used and hibari's first default.
- trafilatura_fast: trafilatura without the fallbacks (`fast=True`).
- trafilatura_pretrim: trafilatura_fast on HTML whose script/style/noscript/svg/template elements, comments and
  ruby annotations were cut out by one regex pass first (trafilatura discards them anyway, after lxml parsed them).
- resiliparse: resiliparse's main-content heuristics (lexbor DOM, C speed).
- resiliparse_pretrim: resiliparse on the pre-trimmed HTML (without it, furigana is read into the text).
"""

from __future__ import annotations

import re
from typing import Callable

EXTRACTORS = ("trafilatura", "trafilatura_fast", "trafilatura_pretrim", "resiliparse", "resiliparse_pretrim")

_RE_BLANK_LINES = re.compile(r"\n[ \t\r]*(?:\n[ \t\r]*)+")
# elements whose content is never main text; closed by the same tag name (they do not nest in valid HTML)
_NON_TEXT = ("script", "style", "noscript", "svg", "template")
_RE_OPEN = re.compile(r"<(script|style|noscript|svg|template)\b|<!--", re.IGNORECASE)
_RE_CLOSE = {name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in _NON_TEXT}
_RE_CLOSE["--"] = re.compile(r"-->")
# ruby annotations (furigana; end tags optional, so up to the next tag) and the ruby/rb tags around the base text:
# left in, the reading is glued into the sentence (trafilatura drops <rt>; resiliparse keeps it and drops bases).
# [^<>] keeps every attempt within one tag: linear time on hostile pages too
_RE_RUBY = re.compile(r"<(?:rt|rp)\b[^<>]*>[^<]*(?:</(?:rt|rp)\s*>)?|</?(?:ruby|rb)\b[^<>]*>", re.IGNORECASE)


def pretrim_html(html: str) -> str:
    """Cut script/style/noscript/svg/template elements, comments and ruby annotations (the base text stays);
    an unclosed element or comment is left as it is. Linear time: once a kind of element has no closing tag
    left, its later openings are not searched again (a page of 100k `<script` openings costs one pass)."""
    out = []
    pos = 0
    unclosed: set[str] = set()
    while True:
        m = _RE_OPEN.search(html, pos)
        if m is None:
            break
        kind = (m.group(1) or "--").lower()
        close = None if kind in unclosed else _RE_CLOSE[kind].search(html, m.end())
        if close is None:
            unclosed.add(kind)
            out.append(html[pos:m.end()])
            pos = m.end()
            continue
        out.append(html[pos:m.start()])
        out.append(" ")
        pos = close.end()
    out.append(html[pos:])
    return _RE_RUBY.sub("", "".join(out))


def _trafilatura(fast: bool, pretrim: bool) -> Callable[[str], str]:
    import inspect

    import trafilatura

    # trafilatura 2.x calls "without fallbacks" `fast`; older releases `no_fallback`
    fast_arg = "fast" if "fast" in inspect.signature(trafilatura.extract).parameters else "no_fallback"
    options = {"include_comments": False, "include_tables": False, fast_arg: fast}

    def extract(html: str) -> str:
        if pretrim:
            html = pretrim_html(html)
        return trafilatura.extract(html, **options) or ""

    return extract


def _resiliparse(pretrim: bool) -> Callable[[str], str]:
    from resiliparse.extract.html2text import extract_plain_text

    def extract(html: str) -> str:
        if pretrim:
            html = pretrim_html(html)
        # resiliparse separates blocks by blank lines; trafilatura (and Swallow's data) by single newlines
        return _RE_BLANK_LINES.sub("\n", extract_plain_text(html, main_content=True, alt_texts=False) or "")

    return extract


def make_extractor(method: str) -> Callable[[str], str]:
    """The extraction function of one method (imports its library once, here)."""
    if method == "trafilatura":
        return _trafilatura(fast=False, pretrim=False)
    if method == "trafilatura_fast":
        return _trafilatura(fast=True, pretrim=False)
    if method == "trafilatura_pretrim":
        return _trafilatura(fast=True, pretrim=True)
    if method == "resiliparse":
        return _resiliparse(pretrim=False)
    if method == "resiliparse_pretrim":
        return _resiliparse(pretrim=True)
    raise ValueError(f"unknown extractor {method!r}: expected one of {', '.join(EXTRACTORS)}")
