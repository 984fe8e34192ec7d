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

Speed: the character n-gram statistics for n = 2..10 come from ONE ordering of the text's positions by their
10-character prefix (an integer sort on the first 4 characters packed in a uint64, then only the tied positions
re-sorted by the next 6) plus the common prefix of sorted neighbours (capped at 10): equal n-grams are contiguous
in that order, and neighbours belong to the same n-gram iff their first n characters agree. Positions whose suffix
is shorter than n never join (their zero-padded windows differ), so no n-gram crosses the end of the text. Exact:
no hashing.
"""

from __future__ import annotations

import operator
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

# the reference applies `[^。．！？!?]+[。．！？!?]?` per line; excluding '\n' from the class gives the same matches
# on the whole text at once
_RE_SENTENCE = re.compile(r"[^。．！？!?\n]+[。．！？!?]?")
# characters the per-line sentence regex skips: terminators at a line start or right after another terminator
_RE_SKIPPED_AT_LINE_START = re.compile(r"(?m)^[。．！？!?]+")
_RE_TERMINATOR_RUN = re.compile(r"([。．！？!?])[。．！？!?]+")
# whether the two substitutions below change anything; three simple searches are far faster than one `(?m)^...|...`
# pattern, which defeats the regex engine's first-character scan
_TERMINATORS = frozenset("。．！？!?")
_RE_TERMINATOR_AFTER_NEWLINE = re.compile(r"\n[。．！？!?]")
_RE_TWO_TERMINATORS = re.compile(r"[。．！？!?]{2}")
_IS_TERMINATOR = np.zeros(0x10000, dtype=bool)
_IS_TERMINATOR[[ord(c) for c in _TERMINATORS]] = True
_ELLIPSIS_ENDINGS = ("・", "…")
# ・ or … then whitespace other than a newline up to a line end: the sentences that end with an ellipsis once
# stripped (re's \s and str.rstrip agree on what whitespace is)
_RE_ELLIPSIS_AT_LINE_END = re.compile(r"[・…][^\S\n]*(?=\n|\Z)")

NGRAM_TOP_RANGE = (2, 3, 4)
NGRAM_DUP_RANGE = (5, 6, 7, 8, 9, 10)
_MAX_N = 10
_TOP_KEY = {n: f"top_{n}gram_character_fraction" for n in NGRAM_TOP_RANGE}
_DUP_KEY = {n: f"duplicate_{n}gram_character_fraction" for n in NGRAM_DUP_RANGE}

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


_U64 = np.uint64
_BELOW = (_U64(1 << 48), _U64(1 << 32), _U64(1 << 16))


def _joined_neighbours(cp: np.ndarray) -> np.ndarray:
    """joined[n-1, j]: positions j and j+1 of the text, sorted by their 10-character prefix (padded past the end
    with 0, which sorts before every character), share their first n characters. Shape (10, len(cp) - 1)."""
    n = len(cp)
    if int(cp.max()) < 0xFFFF:
        values = cp + 1
    else:
        uniq, inverse = np.unique(cp, return_inverse=True)  # dense ranks keep the order
        if len(uniq) >= 0xFFFF:
            return _joined_neighbours_wide(inverse + 1)
        values = inverse + 1
    # characters as big-endian uint16, so 4 consecutive ones read as one uint64 compare like the 4-gram
    pad = np.zeros(n + _MAX_N + 2, dtype=">u2")
    pad[:n] = values
    k1 = np.ndarray(shape=(n,), dtype=">u8", buffer=pad, strides=(2,)).astype(np.uint64)  # chars 0-3
    k2 = np.ndarray(shape=(n,), dtype=">u8", buffer=pad, offset=8, strides=(2,)).astype(np.uint64)  # 4-7
    k3 = np.ndarray(shape=(n,), dtype=">u4", buffer=pad, offset=16, strides=(2,)).astype(np.uint32)  # 8-9
    return _joined_from_keys(k1, k2, k3)


def _prefix_order(k1: np.ndarray, k2: np.ndarray, k3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ordered by their 10-character prefix, and their sorted characters 0-3: one integer sort on
    characters 0-3, then only the positions sharing a 4-gram re-sorted by characters 4-9."""
    order = np.argsort(k1)
    s1 = k1[order]
    tie = s1[1:] == s1[:-1]
    if tie.any():
        in_tie = np.zeros(len(k1), dtype=bool)
        in_tie[1:] = tie
        in_tie[:-1] |= tie
        sub = order[in_tie]
        order[in_tie] = sub[np.lexsort((k3[sub], k2[sub], s1[in_tie]))]
    return order, s1


def _joined_from_keys(k1: np.ndarray, k2: np.ndarray, k3: np.ndarray) -> np.ndarray:
    """`_joined_neighbours` from each position's characters 0-3 / 4-7 (uint64) and 8-9 (uint32), 16 bits each."""
    n = len(k1)
    order, s1 = _prefix_order(k1, k2, k3)
    x1 = s1[1:] ^ s1[:-1]
    s2 = k2[order]
    x2 = s2[1:] ^ s2[:-1]
    s3 = k3[order]
    x3 = s3[1:] ^ s3[:-1]
    joined = np.empty((_MAX_N, n - 1), dtype=bool)
    for row, x in ((0, x1), (4, x2)):
        for i, bound in enumerate(_BELOW):  # common prefix >= 1, 2, 3 characters of this 4-character word
            np.less(x, bound, out=joined[row + i])
        np.equal(x, 0, out=joined[row + 3])
    np.less(x3, 1 << 16, out=joined[8])
    np.equal(x3, 0, out=joined[9])
    joined[4:8] &= joined[3]
    joined[8:] &= joined[7]
    return joined


def _joined_neighbours_wide(values: np.ndarray) -> np.ndarray:
    """Same for texts with >= 65535 distinct characters: sort the 10-character windows as byte strings."""
    n = len(values)
    pad = np.zeros(n + _MAX_N, dtype=">u4")
    pad[:n] = values
    windows = np.ndarray(shape=(n, _MAX_N), dtype=">u4", buffer=pad, strides=(4, 4))
    keys = np.ascontiguousarray(windows).view(f"S{4 * _MAX_N}").ravel()
    columns = np.sort(keys).view("u4").reshape(n, _MAX_N).T
    joined = np.empty((_MAX_N, n - 1), dtype=bool)
    np.equal(columns[:, 1:], columns[:, :-1], out=joined)
    np.logical_and.accumulate(joined, axis=0, out=joined)
    return joined


def ngram_statistics(text: str, cp: np.ndarray | None = None) -> dict[str, float]:
    """top_{2,3,4}gram_character_fraction and duplicate_{5..10}gram_character_fraction of `text`."""
    out: dict[str, float] = {}
    n_chars = len(text)
    if n_chars < 2:
        for n in NGRAM_TOP_RANGE:
            out[_TOP_KEY[n]] = 0.0
        for n in NGRAM_DUP_RANGE:
            out[_DUP_KEY[n]] = 0.0
        return out
    return _ngram_statistics_from_joined(n_chars, _joined_neighbours(_code_points(text) if cp is None else cp))


def _ngram_statistics_from_joined(n_chars: int, joined: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    # equal n-grams are contiguous in sorted order, so groups of >= 2 equal n-grams = runs of joined neighbours
    num_joined = joined.sum(axis=1, dtype=np.int32)  # (sum with an int dtype is ~2x faster than count_nonzero)
    num_groups = (joined[:, 1:] > joined[:, :-1]).sum(axis=1, dtype=np.int32) + joined[:, 0]  # run starts
    for n in NGRAM_TOP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[_TOP_KEY[n]] = 0.0
            continue
        # longest run of joined neighbours, plus one = size of the largest group of equal n-grams
        if not num_joined[n - 1]:
            run = 0
        else:
            breaks = np.flatnonzero(~joined[n - 1])
            if not len(breaks):
                run = n_chars - 1
            else:
                run = max(int(breaks[0]), n_chars - 2 - int(breaks[-1]),
                          int((breaks[1:] - breaks[:-1]).max()) - 1 if len(breaks) > 1 else 0)
        out[_TOP_KEY[n]] = (run + 1) / total
    for n in NGRAM_DUP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[_DUP_KEY[n]] = 0.0
            continue
        out[_DUP_KEY[n]] = int(num_groups[n - 1]) / (total - int(num_joined[n - 1]))
    return out


def _duplicates(items: list[str]) -> tuple[int, int, int]:
    """(number of extra copies, characters in extra copies, total characters)."""
    distinct = set(items)
    total_chars = sum(map(len, items))
    return len(items) - len(distinct), total_chars - sum(map(len, distinct)), total_chars


def quality_features(text: str, ng_matcher=None) -> dict[str, float]:
    """All Swallow quality features of `text` (names as in the reference). With an `NGWordMatcher`, also
    `num_ng_letters` and `ng_fraction` (matched characters / num_japanese_letters)."""
    cp = _code_points(text)
    f = _script_and_sentence_features(text, cp)
    f.update(ngram_statistics(text, cp))
    if ng_matcher is not None:
        f.update(ng_matcher.stat(text, f["num_japanese_letters"]))
    return f


def num_japanese_letters(text: str) -> int:
    """hiragana + katakana + kanji + kuten + toten (the denominator of ng_fraction)."""
    if not text:
        return 0
    counts = np.bincount(_CATEGORY[_code_points(text)], minlength=6)
    return int(counts[1:].sum())


def quality_keep(text: str, ng_matcher=None, ng_max_fraction: float = 0.05) -> tuple[bool, list[str]]:
    """The keep decision of `quality_decision(quality_features(text, ng_matcher))`, cheaper: the n-gram statistics
    and the NG scan run only if the cheaper rules all pass. Reasons list only the first failing stage's rules."""
    cp = _code_points(text)
    f = _script_and_sentence_features(text, cp)
    reasons = _fired(f, _CHEAP_RULES)
    if f["max_sentence_length"] == 0:
        reasons.append(REASON_NO_SENTENCES)
    if reasons:
        return False, reasons
    f.update(ngram_statistics(text, cp))
    reasons = _fired(f, _NGRAM_RULES)
    if reasons:
        return False, reasons
    if ng_matcher is not None:
        f.update(ng_matcher.stat(text, f["num_japanese_letters"]))
        if f["ng_fraction"] >= ng_max_fraction:
            return False, [f"ng_fraction>={ng_max_fraction:g}"]
    return True, []


def _script_and_sentence_features(text: str, cp: np.ndarray) -> dict[str, float]:
    if text:
        counts = np.bincount(_CATEGORY[cp], minlength=6).tolist()
    else:
        counts = [0] * 6
    return _script_and_sentence_from_counts(text, counts)


def _script_and_sentence_from_counts(text: str, counts: list[int], has_skipped: bool | None = None
                                     ) -> dict[str, float]:
    """Script and sentence features from the per-category character counts of `text` (see `_CATEGORY`);
    `has_skipped`: whether the text has a terminator at a line start or right after another one (None: look)."""
    f: dict[str, float] = {}
    n_letters = len(text)
    f["num_letters"] = n_letters
    _, hira, kata, kanji, kuten, toten = counts
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
    if has_skipped is None:
        has_skipped = (text and text[0] in _TERMINATORS) or _RE_TERMINATOR_AFTER_NEWLINE.search(text) \
            or _RE_TWO_TERMINATORS.search(text)
    if has_skipped:
        paragraphs = _RE_TERMINATOR_RUN.sub(r"\1", _RE_SKIPPED_AT_LINE_START.sub("", text)).split("\n")
    else:
        paragraphs = text.split("\n")
    n_sent = len(sentences)
    if n_sent:
        lengths = list(map(len, sentences))
        f["avg_sentence_length"] = sum(lengths) / n_sent
        f["max_sentence_length"] = max(lengths)
        # a sentence whose stripped end is ・ or … has no terminator, so it ends at a line end: count those places
        n_ellipsis = len(_RE_ELLIPSIS_AT_LINE_END.findall(text)) if "・" in text or "…" in text else 0
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
    return f


_OPS = {"<": operator.lt, ">": operator.gt, ">=": operator.ge}


def _compile(rules) -> tuple:
    return tuple((name, _OPS[op], threshold, f"{name}{op}{threshold:g}") for name, op, threshold in rules)


_COMPILED = {group: _compile(rules) for group, rules in RULE_GROUPS.items()}
_NGRAM_FEATURES = {f"top_{n}gram_character_fraction" for n in NGRAM_TOP_RANGE} | \
    {f"duplicate_{n}gram_character_fraction" for n in NGRAM_DUP_RANGE}
_CHEAP_RULES = tuple(r for r in _COMPILED["quality"] if r[0] not in _NGRAM_FEATURES)
_NGRAM_RULES = tuple(r for r in _COMPILED["quality"] if r[0] in _NGRAM_FEATURES)


def _fired(features: dict, compiled) -> list[str]:
    return [reason for name, op, threshold, reason in compiled if op(features[name], threshold)]


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
        reasons.extend(_fired(features, _COMPILED[group]))
        if group == "quality":
            if features["max_sentence_length"] == 0:
                reasons.append(REASON_NO_SENTENCES)
            if features["num_letters"] < max(NGRAM_TOP_RANGE):
                reasons.append(REASON_SHORTER_THAN_NGRAM)
    return not reasons, reasons


# ------------------------------------------------------------------ batches
_BATCH_DOCS = 4096  # documents per set of numpy calls (bounds the temporary arrays)
_ZERO_NGRAM_STATISTICS = {**{_TOP_KEY[n]: 0.0 for n in NGRAM_TOP_RANGE}, **{_DUP_KEY[n]: 0.0 for n in NGRAM_DUP_RANGE}}


def quality_features_batch(texts, ng_matcher=None) -> list[dict[str, float]]:
    """`[quality_features(t, ng_matcher) for t in texts]`, exactly (same values, same key order), faster: at ~1,000
    characters per document per-call overheads dominate, so the script counts, the sentence regexes' fast-path test
    and the NG-word scan run once over the whole batch; the n-gram statistics stay per document (sorting ~1,000
    cache-resident keys per document beats one big sort, measured)."""
    texts = list(texts)
    out: list[dict[str, float]] = []
    for start in range(0, len(texts), _BATCH_DOCS):
        out.extend(_features_batch(texts[start:start + _BATCH_DOCS], ng_matcher))
    return out


def _distinct_uint16(cp: np.ndarray) -> np.ndarray | None:
    """Characters as distinct values 1..0xFFFF (0 is padding): code point + 1 below U+FFFF, the rest take values
    that no character of this batch uses (n-gram statistics only depend on which characters are equal). None when
    the batch has too many distinct characters."""
    if not len(cp):
        return None
    values = cp + 1
    high = cp >= 0xFFFF
    if not high.any():
        return values
    used = np.zeros(0x10000, dtype=bool)
    used[values[~high]] = True
    big, inverse = np.unique(cp[high], return_inverse=True)
    free = np.flatnonzero(~used[1:])[:len(big)] + 1
    if len(free) < len(big):
        return None
    values[high] = free[inverse]
    return values


def _features_batch(texts: list[str], ng_matcher) -> list[dict[str, float]]:
    n_docs = len(texts)
    if not n_docs:
        return []
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=n_docs)
    cp = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    doc_of_char = np.repeat(np.arange(n_docs, dtype=np.int64), lens)
    counts = np.bincount(doc_of_char * 6 + _CATEGORY[cp], minlength=6 * n_docs).reshape(n_docs, 6).tolist()
    # terminators at a line start or right after another terminator, per document, in one pass
    is_term = _IS_TERMINATOR[np.minimum(cp, 0xFFFF)]
    after = np.empty(len(cp), dtype=bool)
    if len(cp):
        after[0] = True
        np.logical_or(is_term[:-1], cp[:-1] == 10, out=after[1:])
        doc_start = np.cumsum(lens) - lens
        after[doc_start[lens > 0]] = True
    has_skipped = np.zeros(n_docs, dtype=bool)
    has_skipped[doc_of_char[is_term & after]] = True
    feats = [_script_and_sentence_from_counts(t, c, h) for t, c, h in zip(texts, counts, has_skipped.tolist())]
    values = _distinct_uint16(cp)
    if values is not None:
        # the n-gram sort keys of every document from one buffer (documents 12 zero characters apart)
        gap = _MAX_N + 2
        pad = np.zeros(len(cp) + gap * n_docs, dtype=">u2")
        pad[np.arange(len(cp)) + gap * doc_of_char] = values
        span = len(pad) - gap
        k1 = np.ndarray(shape=(span,), dtype=">u8", buffer=pad, strides=(2,)).astype(np.uint64)
        k2 = np.ndarray(shape=(span,), dtype=">u8", buffer=pad, offset=8, strides=(2,)).astype(np.uint64)
        k3 = np.ndarray(shape=(span,), dtype=">u4", buffer=pad, offset=16, strides=(2,)).astype(np.uint32)
        for f, ngram in zip(feats, _ngram_statistics_keys_batch(k1, k2, k3, lens.tolist(), gap)):
            f.update(ngram)
    else:
        offset = 0
        for f, text, length in zip(feats, texts, lens.tolist()):
            f.update(ngram_statistics(text, cp[offset:offset + length]))
            offset += length
    if ng_matcher is not None:
        for f, n_ng in zip(feats, ng_matcher.num_ng_letters_batch(texts)):
            n_ja = f["num_japanese_letters"]
            f["num_ng_letters"] = n_ng
            f["ng_fraction"] = n_ng / n_ja if n_ja > 0 else 0.0
    return feats


def _ngram_statistics_keys_batch(k1, k2, k3, lens: list[int], gap: int) -> list[dict[str, float]]:
    """`ngram_statistics` of each document of a batch from the sort keys of `_joined_neighbours` (documents `gap`
    positions apart). Only the sort runs per document (sorting ~1,000 cache-resident keys per document beats one
    sort of the batch); the neighbour comparisons and counts run once on the concatenated sorted orders, with
    pairs across two documents masked and per-document segment reductions."""
    pieces = []
    start = 0
    for length in lens:
        if length >= 2:
            end = start + length
            order, _ = _prefix_order(k1[start:end], k2[start:end], k3[start:end])
            order += start
            pieces.append(order)
        start += length + gap
    out = []
    if pieces:
        order = np.concatenate(pieces)
        seg_lens = np.array([n for n in lens if n >= 2], dtype=np.int64)
        seg_start = np.zeros(len(seg_lens), dtype=np.int64)
        np.cumsum(seg_lens[:-1], out=seg_start[1:])
        total_n = int(seg_lens.sum())
        s1 = k1[order]
        x1 = s1[1:] ^ s1[:-1]
        s2 = k2[order]
        x2 = s2[1:] ^ s2[:-1]
        s3 = k3[order]
        x3 = s3[1:] ^ s3[:-1]
        # joined[r, j]: sorted positions j, j+1 of one document share their first r+1 characters; a document's
        # last column pairs it with the next document and is False
        joined = np.empty((_MAX_N, total_n), dtype=bool)
        for row, x in ((0, x1), (4, x2)):
            for i, bound in enumerate(_BELOW):
                np.less(x, bound, out=joined[row + i, :-1])
            np.equal(x, 0, out=joined[row + 3, :-1])
        np.less(x3, 1 << 16, out=joined[8, :-1])
        np.equal(x3, 0, out=joined[9, :-1])
        joined[:, seg_start + seg_lens - 1] = False
        joined[4:8] &= joined[3]
        joined[8:] &= joined[7]
        num_joined = np.add.reduceat(joined, seg_start, axis=1, dtype=np.int32)
        run_start = np.empty_like(joined)
        run_start[:, 0] = joined[:, 0]
        np.greater(joined[:, 1:], joined[:, :-1], out=run_start[:, 1:])
        num_groups = np.add.reduceat(run_start, seg_start, axis=1, dtype=np.int32)
        longest = []
        for n in NGRAM_TOP_RANGE:  # longest run of joined neighbours per document (each ends with a break)
            breaks = np.flatnonzero(~joined[n - 1])
            gaps = np.diff(breaks, prepend=-1) - 1
            longest.append(np.maximum.reduceat(gaps, np.searchsorted(breaks, seg_start)).tolist())
        num_joined = num_joined.tolist()
        num_groups = num_groups.tolist()
    k = 0
    for n_chars in lens:
        if n_chars < 2:
            out.append(dict(_ZERO_NGRAM_STATISTICS))
            continue
        f: dict[str, float] = {}
        for i, n in enumerate(NGRAM_TOP_RANGE):
            total = n_chars - n + 1
            f[_TOP_KEY[n]] = (longest[i][k] + 1) / total if total > 0 else 0.0
        for n in NGRAM_DUP_RANGE:
            total = n_chars - n + 1
            f[_DUP_KEY[n]] = num_groups[n - 1][k] / (total - num_joined[n - 1][k]) if total > 0 else 0.0
        out.append(f)
        k += 1
    return out
