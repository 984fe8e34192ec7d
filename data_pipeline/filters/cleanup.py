"""Swallow phase-4 cleanup: footer trimming and kutoten normalization (swallow-corpus modify_*.py semantics).

NFKC is deliberately NOT applied here: Swallow normalizes only tokenizer-training text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

FOOTER_WORDS_FILE = Path(__file__).resolve().parents[1] / "corpus" / "assets" / "footer-words.txt"

# a Japanese character or closing bracket before the punctuation (code points above U+FFFF are not matched:
# the reference's surrogate-pair branch never matches a Python 3 string)
_JA_BEFORE = r"[）」』］〕】〉》\u3041-\u3096\u30A1-\u30FA々〇〻\u3400-\u9FFF\uF900-\uFAFF]"
_RE_TOTEN_JA = re.compile(_JA_BEFORE + "、+")
_RE_TOTEN_WESTERN = re.compile(_JA_BEFORE + "，+")
_RE_KUTEN_JA = re.compile(_JA_BEFORE + "。+")
_RE_KUTEN_WESTERN = re.compile(_JA_BEFORE + "．+")
# replace Western forms except right after a full-width digit / Latin letter (so ３．１４ stays); the reference's
# class also excludes '^' (a typo kept for parity)
_RE_TOTEN_TARGET = re.compile(r"([^０-９^Ａ-Ｚ^ａ-ｚ])(，+)")
_RE_KUTEN_TARGET = re.compile(r"([^０-９^Ａ-Ｚ^ａ-ｚ])(．+)")


def _count(regex: re.Pattern, text: str) -> int:
    return sum(1 for _ in regex.finditer(text))


def normalize_kutoten(text: str) -> tuple[str, bool, bool]:
    """(text, toten_replaced, kuten_replaced): use 、/。 when the Western ，/． is the more frequent form after
    Japanese characters."""
    toten = kuten = False
    if "，" in text and _count(_RE_TOTEN_JA, text) < _count(_RE_TOTEN_WESTERN, text):
        text = _RE_TOTEN_TARGET.sub(lambda m: m.group(1) + "、" * len(m.group(2)), text)
        toten = True
    if "．" in text and _count(_RE_KUTEN_JA, text) < _count(_RE_KUTEN_WESTERN, text):
        text = _RE_KUTEN_TARGET.sub(lambda m: m.group(1) + "。" * len(m.group(2)), text)
        kuten = True
    return text, toten, kuten


@lru_cache(maxsize=8)
def load_footer_words(path: str | None = None) -> tuple[str, ...]:
    """Keywords longest first (ties alphabetically, so the result is deterministic); '#' lines are comments."""
    text = Path(path or FOOTER_WORDS_FILE).read_text(encoding="utf-8")
    words = {w.strip("\r") for w in text.split("\n") if w.strip() and not w.startswith("#")}
    return tuple(sorted(words, key=lambda w: (-len(w), w)))


def footer_ratio(line: str, words: tuple[str, ...]) -> float:
    """Fraction of the line's characters removed by deleting the keywords one after another, longest first."""
    if not line:
        return 0.0
    rest = line
    for w in words:
        if w in rest:
            rest = rest.replace(w, "")
    return (len(line) - len(rest)) / len(line)


def trim_footer(text: str, last_lines: int = 10, threshold: float = 0.3,
                words: tuple[str, ...] | None = None) -> str:
    """Cut the text from the first of its last `last_lines` lines whose footer ratio exceeds `threshold`."""
    words = load_footer_words() if words is None else words
    lines = text.split("\n")
    for i in range(max(0, len(lines) - last_lines), len(lines)):
        if footer_ratio(lines[i], words) > threshold:
            return "\n".join(lines[:i])
    return text
