"""Swallow corpus quality features (arXiv 2404.17733), reference-compatible and vectorized.

Every feature equals what the authors' `annotate_quality.py` computes (swallow-llm/swallow-corpus), including:
- paragraphs are the per-line concatenations of the sentences the sentence regex finds (so a run of terminators
  such as `。。` keeps only its first character, and terminators at the start of a line are dropped);
- kanji are `々〇〻`, U+3400-U+9FFF, U+F900-U+FAFF only: the reference's surrogate-pair branch never matches a
  Python 3 string, so code points above U+FFFF are not kanji;
- `duplicate_{n}gram_character_fraction` = distinct n-grams occurring more than once / distinct n-grams
  (the reference README describes an occurrence-weighted ratio; the code, which we follow, does this).

Where the reference crashes (empty text, no sentence, text shorter than n for a top-n-gram feature) we return 0.0
for the undefined feature and `quality_decision` drops the document with an explicit reason.

Speed: the character n-gram statistics for n = 2..10 come from ONE sort of the text's positions by their
10-character prefix plus the common prefix of sorted neighbours (capped at 10): equal n-grams are contiguous in
that order, and neighbours belong to the same n-gram iff their first n characters agree. Positions whose suffix is
shorter than n never join (their padded windows differ), so no n-gram crosses the end of the text.
"""

from __future__ import annotations

import re

import numpy as np

# categories of the per-code-point lookup table
_OTHER, _HIRAGANA, _KATAKANA, _KANJI, _KUTEN, _TOTEN = range(6)
_CATEGORY = np.zeros(0x110000, dtype=np.uint8)
_CATEGORY[0x3041:0x3097] = _HIRAGANA
_CATEGORY[0x30A1:0x30FB] = _KATAKANA
_CATEGORY[0x3400:0xA000] = _KANJI
_CATEGORY[0xF900:0xFB00] = _KANJI
for _c in "々〇〻":
    _CATEGORY[ord(_c)] = _KANJI
for _c in "、，":
    _CATEGORY[ord(_c)] = _TOTEN
for _c in "。．！？":
    _CATEGORY[ord(_c)] = _KUTEN

_TERMINATORS = "。．！？!?"
# the reference applies `[^。．！？!?]+[。．！？!?]?` per line; excluding '\n' from the class gives the same matches
# on the whole text at once
_RE_SENTENCE = re.compile(r"[^。．！？!?\n]+[。．！？!?]?")
# characters the per-line sentence regex skips: terminators at a line start or right after another terminator
_RE_UNMATCHED = re.compile(r"(?m)(?:^|(?<=[。．！？!?]))[。．！？!?]+")
_ELLIPSIS_ENDINGS = ("・", "…")

NGRAM_TOP_RANGE = (2, 3, 4)
NGRAM_DUP_RANGE = (5, 6, 7, 8, 9, 10)
_MAX_N = 10

FEATURE_NAMES: tuple[str, ...] = (
    "num_letters", "num_hiragana_letters", "num_katakana_letters", "num_kanji_letters", "num_kuten", "num_toten",
    "num_japanese_letters", "hiragana_fraction", "katakana_fraction", "kanji_fraction", "kuten_fraction",
    "toten_fraction", "japanese_fraction", "avg_sentence_length", "max_sentence_length",
    "num_sentences_ending_with_ellipsis", "ellipsis_fraction", "duplicate_paragraph_fraction",
    "duplicate_paragraph_fraction_in_character", "duplicate_sentence_fraction",
    "duplicate_sentence_fraction_in_character",
    *(f"top_{n}gram_character_fraction" for n in NGRAM_TOP_RANGE),
    *(f"duplicate_{n}gram_character_fraction" for n in NGRAM_DUP_RANGE),
)
NG_FEATURE_NAMES: tuple[str, ...] = ("num_ng_letters", "ng_fraction")

# (feature, op, threshold): the document is dropped when `feature op threshold` holds (Swallow `apply_v1`)
QUALITY_RULES: tuple[tuple[str, str, float], ...] = (
    ("num_letters", "<", 400),
    ("num_japanese_letters", "<", 400),
    ("hiragana_fraction", "<", 0.2),
    ("katakana_fraction", ">", 0.5),
    ("japanese_fraction", "<", 0.5),
    ("avg_sentence_length", "<", 20),
    ("avg_sentence_length", ">", 90),
    ("max_sentence_length", ">", 200),
    ("ellipsis_fraction", ">", 0.2),
    ("duplicate_paragraph_fraction", ">", 0.30),
    ("duplicate_sentence_fraction", ">", 0.30),
    ("duplicate_paragraph_fraction_in_character", ">", 0.20),
    ("duplicate_sentence_fraction_in_character", ">", 0.20),
    ("top_2gram_character_fraction", ">", 0.20),
    ("top_3gram_character_fraction", ">", 0.18),
    ("top_4gram_character_fraction", ">", 0.16),
    ("duplicate_5gram_character_fraction", ">", 0.15),
    ("duplicate_6gram_character_fraction", ">", 0.14),
    ("duplicate_7gram_character_fraction", ">", 0.13),
    ("duplicate_8gram_character_fraction", ">", 0.12),
    ("duplicate_9gram_character_fraction", ">", 0.11),
    ("duplicate_10gram_character_fraction", ">", 0.10),
)
NG_RULES: tuple[tuple[str, str, float], ...] = (("ng_fraction", ">=", 0.05),)  # keep iff ng_fraction < 0.05
RULE_GROUPS = {"quality": QUALITY_RULES, "ngword": NG_RULES}

# reasons for documents on which the reference code crashes (features undefined)
REASON_NO_SENTENCES = "no_sentences"
REASON_SHORTER_THAN_NGRAM = "shorter_than_ngram"


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _prefix_windows(cp: np.ndarray) -> np.ndarray:
    """(len(cp), 10) matrix: row i = the 10 characters from position i, as ranks padded with 0 past the end.

    Rows are sorted lexicographically by the caller, so a shorter suffix sorts before the longer ones it prefixes.
    Common case (all code points < U+FFFF): a zero-copy strided view of uint16 values cp+1."""
    n = len(cp)
    if n and int(cp.max()) < 0xFFFF:
        pad = np.zeros(n + _MAX_N, dtype=">u2")  # big-endian, so the rows' bytes compare like their values
        pad[:n] = cp + 1
    else:
        _, inverse = np.unique(cp, return_inverse=True)
        pad = np.zeros(n + _MAX_N, dtype=">u4")
        pad[:n] = inverse + 1
    step = pad.itemsize
    return np.lib.stride_tricks.as_strided(pad, shape=(n, _MAX_N), strides=(step, step), writeable=False)


def ngram_statistics(text: str) -> dict[str, float]:
    """top_{2,3,4}gram_character_fraction and duplicate_{5..10}gram_character_fraction of `text`."""
    out: dict[str, float] = {}
    n_chars = len(text)
    if n_chars < 2:
        for n in NGRAM_TOP_RANGE:
            out[f"top_{n}gram_character_fraction"] = 0.0
        for n in NGRAM_DUP_RANGE:
            out[f"duplicate_{n}gram_character_fraction"] = 0.0
        return out
    windows = _prefix_windows(_code_points(text))
    # sort the rows as byte strings: lexicographic order of the 10-character prefixes
    keys = np.ascontiguousarray(windows).view(f"S{windows.itemsize * _MAX_N}").ravel()
    order = np.argsort(keys)
    sorted_windows = windows[order]
    # joined[j, n-1]: sorted neighbours j, j+1 share their first n characters (capped LCP >= n)
    joined = np.logical_and.accumulate(sorted_windows[1:] == sorted_windows[:-1], axis=1)
    num_joined = np.count_nonzero(joined, axis=0)
    # groups of equal n-grams with more than one member = runs of joined neighbours
    num_runs = joined[0].astype(np.int64) + np.count_nonzero(joined[1:] & ~joined[:-1], axis=0)
    for n in NGRAM_TOP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[f"top_{n}gram_character_fraction"] = 0.0
            continue
        column = joined[:, n - 1]
        if not num_joined[n - 1]:
            top = 1
        else:
            # longest run of joined neighbours + 1 = size of the largest group of equal n-grams
            edges = np.concatenate(([-1], np.flatnonzero(~column), [len(column)]))
            top = int(np.diff(edges).max())
        out[f"top_{n}gram_character_fraction"] = top / total
    for n in NGRAM_DUP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[f"duplicate_{n}gram_character_fraction"] = 0.0
            continue
        out[f"duplicate_{n}gram_character_fraction"] = int(num_runs[n - 1]) / (total - int(num_joined[n - 1]))
    return out


def _duplicates(items: list[str]) -> tuple[int, int, int]:
    """(number of extra copies, characters in extra copies, total characters)."""
    distinct = set(items)
    total_chars = sum(map(len, items))
    return len(items) - len(distinct), total_chars - sum(map(len, distinct)), total_chars


def quality_features(text: str, ng_matcher=None) -> dict[str, float]:
    """All Swallow quality features of `text` (names as in the reference). With an `NGWordMatcher`, also
    `num_ng_letters` and `ng_fraction` (matched characters / num_japanese_letters)."""
    f: dict[str, float] = {}
    n_letters = len(text)
    f["num_letters"] = n_letters
    if n_letters:
        counts = np.bincount(_CATEGORY[_code_points(text)], minlength=6)
        hira, kata, kanji, kuten, toten = (int(counts[c]) for c in
                                           (_HIRAGANA, _KATAKANA, _KANJI, _KUTEN, _TOTEN))
    else:
        hira = kata = kanji = kuten = toten = 0
    n_ja = hira + kata + kanji + kuten + toten
    f["num_hiragana_letters"] = hira
    f["num_katakana_letters"] = kata
    f["num_kanji_letters"] = kanji
    f["num_kuten"] = kuten
    f["num_toten"] = toten
    f["num_japanese_letters"] = n_ja
    f["hiragana_fraction"] = hira / n_ja if n_ja else 0.0
    f["katakana_fraction"] = kata / n_ja if n_ja else 0.0
    f["kanji_fraction"] = kanji / n_ja if n_ja else 0.0
    f["kuten_fraction"] = kuten / n_ja if n_ja else 0.0
    f["toten_fraction"] = toten / n_ja if n_ja else 0.0
    f["japanese_fraction"] = n_ja / n_letters if n_letters else 0.0

    sentences = _RE_SENTENCE.findall(text)
    paragraphs = _RE_UNMATCHED.sub("", text).split("\n") if any(t in text for t in _TERMINATORS) \
        else text.split("\n")
    n_sent = len(sentences)
    if n_sent:
        lengths = list(map(len, sentences))
        f["avg_sentence_length"] = sum(lengths) / n_sent
        f["max_sentence_length"] = max(lengths)
        n_ellipsis = sum(1 for s in sentences if s.rstrip().endswith(_ELLIPSIS_ENDINGS))
    else:
        f["avg_sentence_length"] = 0.0
        f["max_sentence_length"] = 0
        n_ellipsis = 0
    f["num_sentences_ending_with_ellipsis"] = n_ellipsis
    f["ellipsis_fraction"] = n_ellipsis / n_sent if n_sent else 0.0

    dup_p, dup_p_chars, total_p_chars = _duplicates(paragraphs)
    f["duplicate_paragraph_fraction"] = dup_p / len(paragraphs)
    f["duplicate_paragraph_fraction_in_character"] = dup_p_chars / total_p_chars if total_p_chars else 0.0
    dup_s, dup_s_chars, total_s_chars = _duplicates(sentences)
    f["duplicate_sentence_fraction"] = dup_s / n_sent if n_sent else 0.0
    f["duplicate_sentence_fraction_in_character"] = dup_s_chars / total_s_chars if total_s_chars else 0.0

    f.update(ngram_statistics(text))
    if ng_matcher is not None:
        f.update(ng_matcher.stat(text, n_ja))
    return f


_OPS = {"<": lambda a, b: a < b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def quality_decision(features: dict, rules: tuple[str, ...] | list[str] | None = None) -> tuple[bool, list[str]]:
    """(keep, reasons): a document is dropped if ANY rule of the selected groups fires.

    `rules` names rule groups ("quality", "ngword"); default: every group whose features are present (the NG rule
    applies only when `ng_fraction` was computed). A reason is `"<feature><op><threshold>"`, e.g.
    `"hiragana_fraction<0.2"`; documents the reference cannot score get `no_sentences` / `shorter_than_ngram`."""
    if rules is None:
        groups = ["quality"] + (["ngword"] if "ng_fraction" in features else [])
    else:
        groups = list(rules)
    reasons: list[str] = []
    for group in groups:
        if group not in RULE_GROUPS:
            raise ValueError(f"unknown rule group {group!r}; expected one of {sorted(RULE_GROUPS)}")
        if group == "ngword" and "ng_fraction" not in features:
            raise ValueError("rule group 'ngword' needs the ng_fraction feature (annotate with an NG word list)")
        if group == "quality":
            if features["max_sentence_length"] == 0:
                reasons.append(REASON_NO_SENTENCES)
            if features["num_letters"] < max(NGRAM_TOP_RANGE):
                reasons.append(REASON_SHORTER_THAN_NGRAM)
        for name, op, threshold in RULE_GROUPS[group]:
            if _OPS[op](features[name], threshold):
                reasons.append(f"{name}{op}{threshold:g}")
    return not reasons, reasons
