"""Typed config of `hibari corpus clean` (YAML via --config, `key=value` overrides via --set)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hibari.config import StrictModel

# UT1 categories the Swallow corpus blocked (all "redirector" variants are matched by prefix)
SWALLOW_UT1_CATEGORIES = [
    "adult", "shopping", "cryptojacking", "games", "redirector", "vpn", "social_networks", "ddos", "gambling",
    "publicite", "bitcoin", "dating", "phishing", "filehosting", "agressif", "chat", "mixed_adult", "celebrity",
    "financial", "manga", "remote-control", "webmail", "malware", "doh", "warez",
]


class ReadConfig(StrictModel):
    max_page_bytes: int = Field(4_000_000, gt=0, description="skip (counted) HTTP payloads larger than this")
    html_content_types: list[str] = ["text/html", "application/xhtml+xml"]


class LanguageConfig(StrictModel):
    rapid_check: bool = True  # <html lang="ja"> or a Japanese <title> before extraction
    identifier: Literal["py3langid", "fasttext"] = "py3langid"
    fasttext_model: str | None = None  # path to a user-supplied fastText LID model (identifier: fasttext)
    min_probability: float = Field(0.0, ge=0.0, le=1.0)  # fastText only: required probability of __label__ja


class ExtractConfig(StrictModel):
    extractor: Literal["trafilatura", "resiliparse"] = "trafilatura"


class QualityConfig(StrictModel):
    enabled: bool = True


class NGWordConfig(StrictModel):
    enabled: bool = True
    # word-list files or directories; null = the lists Swallow used (shipped, MosasoM/inappropriate-words-ja, MIT)
    paths: list[str] | None = None
    max_fraction: float = Field(0.05, ge=0.0, le=1.0)  # keep iff ng_fraction < max_fraction


class BlocklistConfig(StrictModel):
    enabled: bool = True
    ut1_dir: str | None = None  # folder with UT1 <category>/{domains,urls} lists; null = none
    categories: list[str] = Field(default_factory=lambda: list(SWALLOW_UT1_CATEGORIES))
    custom_lists: list[str] = []  # files of hosts/domains (one per line, '#' comments)
    # host patterns always blocked (Swallow: 5ch and Wikipedia, which is added to the corpus separately):
    # "*.d" = d and its subdomains, "*s" = any host ending in s, "d" = d and its subdomains
    host_suffixes: list[str] = ["*.5ch.net", "*wikipedia.org"]


class CleanupConfig(StrictModel):
    footer: bool = True
    footer_last_lines: int = Field(10, ge=0)
    footer_threshold: float = Field(0.3, ge=0.0, le=1.0)
    kutoten: bool = True


class CleanConfig(StrictModel):
    snapshot: str | None = None  # null = from warcinfo isPartOf, else CC-MAIN-YYYY-WW in the file name, else unknown
    read: ReadConfig = ReadConfig()
    language: LanguageConfig = LanguageConfig()
    extract: ExtractConfig = ExtractConfig()
    quality: QualityConfig = QualityConfig()
    ngword: NGWordConfig = NGWordConfig()
    blocklist: BlocklistConfig = BlocklistConfig()
    cleanup: CleanupConfig = CleanupConfig()
    zstd_level: int = Field(3, ge=1, le=22)
