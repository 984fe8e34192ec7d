"""Typed configs of `hibari corpus clean` and `corpus annotate` (YAML via --config, `key=value` overrides via
--set, short flags via `load_stage_config`). Annotate reuses clean's `quality`, `ngword` and `classifier` sections:
the same keys mean the same thing in both."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError

from data_pipeline.classifier.config import ClassifierConfig
from hibari.config import StrictModel, apply_overrides, format_validation_error, read_yaml
from hibari.errors import ConfigError, HibariError

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
    # data_pipeline/corpus/extract.py; quality/speed of each in bench/results/extract_quality.md
    extractor: Literal["trafilatura", "trafilatura_fast", "trafilatura_pretrim", "resiliparse",
                       "resiliparse_pretrim"] = "trafilatura_pretrim"


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
    classifier: ClassifierConfig = ClassifierConfig()  # quality classifier stage, after cleanup (model: null = off)
    zstd_level: int = Field(3, ge=1, le=22)


class AnnotateConfig(StrictModel):
    """`corpus annotate`: every record gets all quality features; `enabled` says whether a rule group decides `keep`
    (`ngword.enabled: false` also skips the NG-word features)."""
    quality: QualityConfig = QualityConfig()
    ngword: NGWordConfig = NGWordConfig()
    classifier: ClassifierConfig = ClassifierConfig()  # model: null = no quality_score


def load_stage_config(schema, path: str | None, overrides: list[str] | None, shortcuts: dict | None = None):
    """A stage's typed config: the YAML file, then `--set a.b=v` overrides, then the short flags given on the command
    line (`shortcuts`: dotted key -> (flag, value); a flag wins). The defaults live only in `schema`. A bad value
    is one line naming the flag when a flag set it, else the file / --set key."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    flags = {}
    for key, (flag, value) in (shortcuts or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # the flag wins over a file value that is not a section
            node = node[part]
        node[leaf] = value
        flags[key] = flag
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"])
        by_flag = next((k for k in flags if key == k or key.startswith(k + ".")), None)  # e.g. ngword.paths.0
        if by_flag is not None:
            raise HibariError(f"{flags[by_flag]}: {e['msg']} (got {e['input']!r})") from None
        raise ConfigError(format_validation_error(err, path or "--set")) from None
