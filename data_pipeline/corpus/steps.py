"""Pipeline steps of `hibari corpus clean`: each one small job with its own counters (datatrove style).

A step's `apply(page)` returns None to pass the page on (possibly modified), a short drop reason, or
(reason, measured value), e.g. ("num_letters<400", "num_letters=262 < 400"). The base class counts pages and
characters in/out and the drop reasons, so the funnel report is just the steps' counters; the dropped page carries
`drop = (stage, reason, value)` for the drop ledger. A new step is a subclass added to `build_steps`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.warc import Page, WarcResponse, content_decode, decode_html, host_of, iso_date, split_http
from hibari.errors import HibariError


class Step:
    name = "step"

    def __init__(self):
        self.pages_in = self.pages_out = self.chars_in = self.chars_out = 0
        self.drops: Counter = Counter()

    def apply(self, page: Page) -> str | tuple[str, str] | None:
        raise NotImplementedError

    def __call__(self, page: Page) -> Page | None:
        self.pages_in += 1
        self.chars_in += page.size()
        reason = self.apply(page)
        if reason is not None:
            reason, value = reason if isinstance(reason, tuple) else (reason, "")
            self.drops[reason] += 1
            page.drop = (self.name, reason, value)
            return None
        self.pages_out += 1
        self.chars_out += page.size()
        return page

    def stats(self) -> dict:
        return {"name": self.name, "pages_in": self.pages_in, "pages_out": self.pages_out,
                "chars_in": self.chars_in, "chars_out": self.chars_out, "drops": dict(self.drops)}


class ParseHttp(Step):
    """HTTP status 200 and an HTML content type; payload de-chunked / un-gzipped when really encoded."""
    name = "http"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        self.html_types = tuple(t.lower() for t in cfg.read.html_content_types)
        self.max_bytes = cfg.read.max_page_bytes

    def apply(self, page: Page):
        parsed = split_http(page.body)
        if parsed is None:
            return "not_http_response", f"block starts {page.body[:16]!r}"
        status, headers, payload = parsed
        page.status, page.http_headers = status, headers
        page.content_type = headers.get("content-type", "")
        if status != 200:
            return f"http_status_{status // 100}xx", f"status={status}"
        media = page.content_type.split(";")[0].strip().lower()
        if media and media not in self.html_types:
            return "not_html", f"content_type={media[:60]}"
        decoded = content_decode(payload, headers, self.max_bytes)
        if decoded is None:  # a decompression bomb stops at the cap: bounded memory, counted
            return "huge_page", (f"decoded {headers.get('content-encoding', '')[:20]} body > {self.max_bytes} bytes "
                                 f"(read.max_page_bytes) from {len(payload)} bytes")
        page.body = decoded
        if not page.body.strip():
            return "empty_payload", f"payload_bytes={len(page.body)}"
        return None


class UrlFilter(Step):
    """Host / URL block list: built-in host suffixes (5ch.net, wikipedia.org), UT1 category lists, custom lists.

    A host is blocked if it or any parent domain is listed; UT1 `urls` entries block that URL prefix."""
    name = "url_blocklist"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        bl = cfg.blocklist
        self.enabled = bl.enabled
        self.host_patterns = tuple(s.strip().lower() for s in bl.host_suffixes if s.strip())
        self.domains: dict[str, str] = {}
        self.url_prefixes: dict[str, str] = {}
        self.categories_missing: list[str] = []
        if bl.ut1_dir:
            root = Path(bl.ut1_dir)
            if not root.is_dir():
                raise HibariError(f"blocklist.ut1_dir {root}: not a directory (expected UT1 <category>/domains)")
            present = {p.name: p for p in root.iterdir() if p.is_dir()}
            for cat in bl.categories:
                # "redirector" also selects its variants (e.g. strict_redirector)
                dirs = [p for name, p in present.items() if name == cat or (cat == "redirector" and
                                                                          name.endswith("redirector"))]
                if not dirs:
                    self.categories_missing.append(cat)
                for d in dirs:
                    self._load(d / "domains", self.domains, f"ut1:{d.name}")
                    self._load(d / "urls", self.url_prefixes, f"ut1:{d.name}")
        for path in bl.custom_lists:
            if not Path(path).is_file():
                raise HibariError(f"blocklist.custom_lists: {path}: no such file")
            self._load(Path(path), self.domains, "custom")

    @staticmethod
    def _load(path: Path, into: dict, label: str) -> None:
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = line.strip().lower()
            if entry and not entry.startswith("#"):
                into.setdefault(entry.split("://", 1)[-1].rstrip("/"), label)

    def reason_for(self, url: str, host: str) -> str | None:
        if not host:
            return "bad_url"  # see warc.host_of: scheme http(s), a host with valid labels
        for pattern in self.host_patterns:
            if host_matches(host, pattern):
                return f"host:{pattern}"
        parts = host.split(".")
        for i in range(len(parts) - 1):
            label = self.domains.get(".".join(parts[i:]))
            if label:
                return label
        if self.url_prefixes:
            rest = url.split("://", 1)[-1].lower().rstrip("/")
            segments = rest.split("/")
            for i in range(1, len(segments) + 1):
                label = self.url_prefixes.get("/".join(segments[:i]))
                if label:
                    return label
        return None

    def apply(self, page: Page):
        if not page.host:  # validated even with the block list off: every kept document has a usable host
            return "bad_url", f"url={page.url[:120]!r}"
        if not self.enabled:
            return None
        reason = self.reason_for(page.url, page.host)
        return None if reason is None else (reason, f"host={page.host}")


def host_matches(host: str, pattern: str) -> bool:
    """`*.example.com`: the domain or any subdomain; `*example.org`: any host ending so (Swallow's
    `*wikipedia.org`); `example.com`: the domain or any subdomain."""
    if pattern.startswith("*."):
        pattern = pattern[2:]
    elif pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return host == pattern or host.endswith("." + pattern)


class Decode(Step):
    name = "decode"

    def apply(self, page: Page) -> str | None:
        decoded = decode_html(page.body, page.content_type)
        if decoded is None:
            return "undecodable", f"content_type={page.content_type[:60]!r}; no candidate charset decodes strictly"
        page.html, page.charset = decoded
        page.body = b""
        if not page.html.strip():
            return "empty_page"
        return None


_RE_HTML_LANG_JA = re.compile(r"""<html[^>]*\slang\s*=\s*["']?ja""", re.IGNORECASE)
_RE_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class RapidJapanese(Step):
    """Before extraction: `<html lang="ja...">` or a `<title>` that the precise identifier calls Japanese."""
    name = "rapid_ja"

    def __init__(self, cfg: CleanConfig, lid):
        super().__init__()
        self.enabled = cfg.language.rapid_check
        self.lid = lid

    def apply(self, page: Page) -> str | None:
        if not self.enabled:
            return None
        head = page.html[:65536]
        if _RE_HTML_LANG_JA.search(head):
            return None
        m = _RE_TITLE.search(head)
        if m:
            import html as _html
            title = _html.unescape(re.sub(r"<[^>]+>", " ", m.group(1))).strip()
            lang, prob = self.lid.language(title) if title else ("", 0.0)
            if title and self.lid.accepts(lang, prob):
                return None
            return "title_not_japanese", f"title={title[:40]!r} lang={lang or '-'}"
        return "no_lang_no_title"


class Extract(Step):
    name = "extract"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        from data_pipeline.corpus.extract import make_extractor
        self.extractor = cfg.extract.extractor
        self.extract_text = make_extractor(self.extractor)  # methods and their measured quality: extract.py

    def apply(self, page: Page) -> str | None:
        try:
            text = self.extract_text(page.html)
        except Exception as err:  # noqa: BLE001 - a page the extractor cannot parse is a counted skip
            return "extractor_error", f"{type(err).__name__}: {str(err)[:100]}"
        page.html = ""
        page.text = (text or "").strip()
        if not page.text:
            return "no_text"
        return None


class LanguageIdentifier:
    """Precise language ID with a model that ships in the package (py3langid) or a user fastText model file."""

    def __init__(self, cfg: CleanConfig):
        lang = cfg.language
        self.kind = lang.identifier
        self.min_probability = lang.min_probability
        if self.kind == "fasttext":
            if not lang.fasttext_model or not Path(lang.fasttext_model).is_file():
                raise HibariError(f"language.fasttext_model {lang.fasttext_model!r}: expected an existing fastText "
                                  "model file (identifier: fasttext)")
            try:
                import fasttext
            except ImportError:
                raise HibariError("language.identifier fasttext: the 'fasttext' package is not installed "
                                  "(pip install fasttext-wheel), or use identifier: py3langid") from None
            self.model = fasttext.load_model(lang.fasttext_model)
        else:
            import py3langid
            self.model = py3langid

    def language(self, text: str) -> tuple[str, float]:
        if self.kind == "fasttext":
            labels, probs = self.model.predict(text.replace("\n", " "), k=1)
            return (labels[0].replace("__label__", "") if labels else ""), float(probs[0]) if len(probs) else 0.0
        lang, score = self.model.classify(text)
        return lang, float(score)

    def is_japanese(self, text: str) -> bool:
        return self.accepts(*self.language(text))

    def accepts(self, lang: str, prob: float) -> bool:
        return lang == "ja" and (self.kind != "fasttext" or prob >= self.min_probability)


class LanguageFilter(Step):
    name = "language"

    def __init__(self, lid: LanguageIdentifier):
        super().__init__()
        self.lid = lid

    def apply(self, page: Page) -> str | None:
        lang, prob = self.lid.language(page.text)
        if self.lid.accepts(lang, prob):
            return None
        return (f"lang:{lang or 'unknown'}" if lang != "ja" else "lang:ja_low_probability"), \
            f"lang={lang or '-'} score={prob:.3g}"


class QualityFilter(Step):
    """Swallow quality rules; the first rule that fires is the counted reason."""
    name = "quality"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        self.enabled = cfg.quality.enabled

    def apply(self, page: Page) -> str | None:
        if not self.enabled:
            return None
        from data_pipeline.filters import quality_keep
        keep, reasons = quality_keep(page.text)  # same decision as the full features, with early exit
        return None if keep else (reasons[0], measured_value(reasons[0], page.text))


class NGWordFilter(Step):
    name = "ngword"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        from data_pipeline.filters import NGWordMatcher
        self.enabled = cfg.ngword.enabled
        self.max_fraction = cfg.ngword.max_fraction
        if self.enabled:
            for p in cfg.ngword.paths or []:
                if not Path(p).exists():
                    raise HibariError(f"ngword.paths: {p}: no such file or directory")
            self.matcher = NGWordMatcher.from_files(cfg.ngword.paths) if cfg.ngword.paths else \
                NGWordMatcher.default()

    def apply(self, page: Page) -> str | None:
        if not self.enabled:
            return None
        from data_pipeline.filters import num_japanese_letters
        stat = self.matcher.stat(page.text, num_japanese_letters(page.text))
        if stat["ng_fraction"] < self.max_fraction:
            return None
        return f"ng_fraction>={self.max_fraction:g}", f"ng_fraction={stat['ng_fraction']:.4g} >= {self.max_fraction:g}"


class Cleanup(Step):
    """Footer trimming, then kutoten normalization. Drops only pages that become empty."""
    name = "cleanup"

    def __init__(self, cfg: CleanConfig):
        super().__init__()
        self.cfg = cfg.cleanup
        self.footer_trimmed = self.toten_normalized = self.kuten_normalized = 0

    def apply(self, page: Page) -> str | None:
        from data_pipeline.filters import normalize_kutoten, trim_footer
        if self.cfg.footer:
            trimmed = trim_footer(page.text, self.cfg.footer_last_lines, self.cfg.footer_threshold)
            if trimmed != page.text:
                self.footer_trimmed += 1
                page.text = trimmed.rstrip()
        if self.cfg.kutoten:
            page.text, toten, kuten = normalize_kutoten(page.text)
            self.toten_normalized += toten
            self.kuten_normalized += kuten
        return None if page.text.strip() else "empty_after_cleanup"

    def stats(self) -> dict:
        out = super().stats()
        out.update(footer_trimmed=self.footer_trimmed, toten_normalized=self.toten_normalized,
                   kuten_normalized=self.kuten_normalized)
        return out


_RE_RULE = re.compile(r"^(\w+?)(<|>=|>)(.+)$")


def measured_value(reason: str, text: str) -> str:
    """`num_letters<400` -> `num_letters=262 < 400` (the feature computed again for the ledger; dropped pages only)."""
    m = _RE_RULE.match(reason)
    if not m:
        return ""
    from data_pipeline.filters import quality_features
    value = quality_features(text).get(m.group(1))
    if value is None:
        return ""
    return f"{m.group(1)}={value:.4g} {m.group(2)} {m.group(3)}"


def build_steps(cfg: CleanConfig) -> list[Step]:
    lid = LanguageIdentifier(cfg)
    steps = [ParseHttp(cfg), UrlFilter(cfg), Decode(), RapidJapanese(cfg, lid), Extract(cfg), LanguageFilter(lid),
             QualityFilter(cfg), NGWordFilter(cfg), Cleanup(cfg)]
    if cfg.classifier.model:  # last: scored in batches of the pages every other stage kept (pipeline.clean_shard)
        from data_pipeline.classifier.step import ClassifierFilter
        steps.append(ClassifierFilter(cfg.classifier))
    return steps


def page_from_response(resp: WarcResponse, snapshot: str, warc_file: str) -> Page:
    return Page(id=resp.record_id, url=resp.url, host=host_of(resp.url), date=iso_date(resp.date),
                snapshot=snapshot, warc_file=warc_file, body=resp.block)
