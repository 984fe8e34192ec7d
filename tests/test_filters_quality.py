"""Swallow quality / NG-word / cleanup filters: exact feature values, both sides of every threshold, parity with a
naive transcription of the reference definitions (on generated strings and on the shared edge-case corpus)."""

from __future__ import annotations

import collections
import itertools
import json
import random
import re
from pathlib import Path

import pytest

from data_pipeline.filters import (FEATURE_NAMES, NGWordMatcher, normalize_kutoten, num_japanese_letters,
                                   quality_decision, quality_features, quality_features_batch, quality_keep,
                                   trim_footer)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def uniq(n: int, start: int = 0x4E00) -> str:
    """n distinct kanji (no accidental n-gram repeats)."""
    return "".join(chr(start + i) for i in range(n))


def reasons_of(text: str, ng=None) -> list[str]:
    return quality_decision(quality_features(text, ng))[1]


# ---------------------------------------------------------------- naive reference (definitions, written plainly)
_RE_SENT = re.compile(r"[^。．！？!?]+[。．！？!?]?")
_RE_KANJI = re.compile(r"[々〇〻\u3400-\u9FFF\uF900-\uFAFF]")


def naive_features(text: str) -> dict:
    doc = [_RE_SENT.findall(line) for line in text.split("\n")]
    paragraphs = ["".join(s) for s in doc]
    sentences = list(itertools.chain.from_iterable(doc))
    r = {}

    def dup(items):
        c = collections.Counter(items)
        return sum(f - 1 for f in c.values()), sum(len(s) * (f - 1) for s, f in c.items())

    a, b = dup(paragraphs)
    total = sum(map(len, paragraphs))
    r["duplicate_paragraph_fraction"] = a / len(paragraphs)
    r["duplicate_paragraph_fraction_in_character"] = b / total if total else 0.0
    a, b = dup(sentences)
    total = sum(map(len, sentences))
    r["duplicate_sentence_fraction"] = a / len(sentences) if sentences else 0.0
    r["duplicate_sentence_fraction_in_character"] = b / total if total else 0.0
    for n in range(2, 11):
        c = collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))
        if n <= 4:
            r[f"top_{n}gram_character_fraction"] = max(c.values()) / sum(c.values()) if c else 0.0
        else:
            r[f"duplicate_{n}gram_character_fraction"] = sum(1 for f in c.values() if f > 1) / len(c) if c else 0.0
    hira = sum(1 for ch in text if 0x3041 <= ord(ch) <= 0x3096)
    kata = sum(1 for ch in text if 0x30A1 <= ord(ch) <= 0x30FA)
    toten = sum(1 for ch in text if ch in "、，")
    kuten = sum(1 for ch in text if ch in "。．！？")
    kanji = len(_RE_KANJI.findall(text))
    nja = hira + kata + kanji + kuten + toten
    r.update(num_letters=len(text), num_hiragana_letters=hira, num_katakana_letters=kata, num_kanji_letters=kanji,
             num_kuten=kuten, num_toten=toten, num_japanese_letters=nja)
    for name, v in (("hiragana", hira), ("katakana", kata), ("kanji", kanji), ("kuten", kuten), ("toten", toten)):
        r[f"{name}_fraction"] = v / nja if nja else 0.0
    r["japanese_fraction"] = nja / len(text) if text else 0.0
    r["avg_sentence_length"] = sum(map(len, sentences)) / len(sentences) if sentences else 0.0
    r["max_sentence_length"] = max(map(len, sentences), default=0)
    r["num_sentences_ending_with_ellipsis"] = sum(1 for s in sentences if s.strip().endswith(("・", "…")))
    r["ellipsis_fraction"] = r["num_sentences_ending_with_ellipsis"] / len(sentences) if sentences else 0.0
    return r


# ---------------------------------------------------------------- exact values and gotchas
def test_feature_names_are_the_reference_list():
    f = quality_features("これはテストです。")
    assert tuple(f) == FEATURE_NAMES or set(f) == set(FEATURE_NAMES)
    assert len(FEATURE_NAMES) == 30
    g = quality_features("これはテストです。", NGWordMatcher(["テスト"]))
    assert g["num_ng_letters"] == 3 and g["ng_fraction"] == 3 / 9


def test_script_counts_exact():
    text = "ひらがなカタカナ漢字々〇〻、，。．！？abc"
    f = quality_features(text)
    assert (f["num_hiragana_letters"], f["num_katakana_letters"], f["num_kanji_letters"]) == (4, 4, 5)
    assert (f["num_toten"], f["num_kuten"], f["num_japanese_letters"]) == (2, 4, 19)
    assert f["num_letters"] == 22
    assert f["japanese_fraction"] == 19 / 22 and f["kanji_fraction"] == 5 / 19 and f["kuten_fraction"] == 4 / 19


def test_kanji_above_bmp_not_counted():
    # the reference's surrogate-pair branch never matches a Python 3 str: U+20BB7 is not kanji
    f = quality_features("𠮷野家")
    assert f["num_kanji_letters"] == 2 and f["num_letters"] == 3


def test_paragraphs_are_joined_sentences():
    # "。。" keeps only its first 。 in the reference's paragraphs, so these two lines are duplicates
    f = quality_features("あいうえお。。\nあいうえお。")
    assert f["duplicate_paragraph_fraction"] == 0.5
    assert f["duplicate_paragraph_fraction_in_character"] == 6 / 12
    # a line starting with terminators: they are skipped too
    assert quality_features("！？かきく\nかきく")["duplicate_paragraph_fraction"] == 0.5


def test_duplicate_ngram_fraction_counts_distinct_ngrams():
    # gotcha: distinct n-grams occurring more than once / distinct n-grams (not occurrence-weighted)
    text = "あいうえお" * 3  # 11 5-grams, 5 distinct, all 5 repeated
    assert quality_features(text)["duplicate_5gram_character_fraction"] == 1.0
    text = uniq(10) + uniq(30, 0x3400) + uniq(10)  # 6 repeated of 50-6 = 40 distinct... see below
    f = quality_features(text)
    assert f["duplicate_5gram_character_fraction"] == 6 / (10 + 30)


def test_edge_cases_do_not_crash_and_drop_with_reason():
    for text in ["", "a", "あ", "。", "\n\n", "。。。"]:
        f = quality_features(text)
        keep, reasons = quality_decision(f)
        assert not keep
        assert set(f) == set(FEATURE_NAMES)
    assert "no_sentences" in quality_decision(quality_features("。。。"))[1]
    assert "shorter_than_ngram" in quality_decision(quality_features("あい"))[1]
    assert quality_features("")["top_2gram_character_fraction"] == 0.0


def test_parity_with_naive_reference_on_random_strings():
    rng = random.Random(7)
    alphabet = ["あ", "い", "ア", "漢", "。", "、", "！", "?", "\n", "…", "・", " ", "a", "𠮷", "\uffff", "\x00", "\r"]
    for trial in range(1500):
        k = 2 + trial % (len(alphabet) - 1)
        text = "".join(rng.choice(alphabet[:k]) for _ in range(rng.randint(0, 80)))
        ours = quality_features(text)
        ref = naive_features(text)
        assert {k2: ours[k2] for k2 in ref} == ref, repr(text)


@pytest.mark.skipif(not (SHARED / "quality-agreement" / "corpus_heldout.jsonl").is_file(),
                    reason="shared/data/quality-agreement not present")
def test_parity_on_shared_edge_case_corpus():
    """Every feature equals the naive reference on all 3,233 real-text edge cases (thresholds 399/400, 200/201...)."""
    path = SHARED / "quality-agreement" / "corpus_heldout.jsonl"
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(docs) > 3000
    ng = NGWordMatcher.default()
    mismatched, decisions = [], []
    for d in docs:
        ours = quality_features(d["text"], ng)
        if {k: ours[k] for k in FEATURE_NAMES} != naive_features(d["text"]):
            mismatched.append(d["id"])
        decisions.append(quality_decision(ours)[0])
    assert mismatched == []
    # the early-exit decision used by `corpus clean` agrees with the full one on every document
    assert [quality_keep(d["text"], ng)[0] for d in docs] == decisions
    assert 0 < sum(decisions) < len(docs)


# ---------------------------------------------------------------- both sides of every threshold
def _sentences(lengths: list[int], ending: str = "。") -> str:
    out, start = [], 0x4E00
    for n in lengths:
        out.append(uniq(n - 1, start) + ending)
        start += n
    return "".join(out)


def _ellipsis_lines(k: int) -> str:
    return "\n".join(uniq(19, 0x7000 + 20 * i) + "…" for i in range(k))


@pytest.mark.parametrize("reason,keep_text,drop_text", [
    ("num_letters<400", "あ" * 400, "あ" * 399),
    ("num_japanese_letters<400", "あ" * 400, "あ" * 399 + "x"),
    ("hiragana_fraction<0.2", "あ" * 20 + "漢" * 80, "あ" * 19 + "漢" * 81),
    ("katakana_fraction>0.5", "ア" * 50 + "あ" * 50, "ア" * 51 + "あ" * 49),
    ("japanese_fraction<0.5", "あ" * 50 + "x" * 50, "あ" * 49 + "x" * 51),
    ("avg_sentence_length<20", _sentences([20] * 5), _sentences([20] * 4 + [19])),
    ("avg_sentence_length>90", _sentences([90] * 3), _sentences([90, 90, 91])),
    ("max_sentence_length>200", _sentences([200, 20]), _sentences([201, 20])),
    # "…" is not a terminator: an ellipsis sentence is one that ends its line
    ("ellipsis_fraction>0.2", _sentences([20] * 8) + "\n" + _ellipsis_lines(2),
     _sentences([20] * 7) + "\n" + _ellipsis_lines(3)),
])
def test_script_and_sentence_thresholds(reason, keep_text, drop_text):
    assert reason not in reasons_of(keep_text)
    assert reason in reasons_of(drop_text)


def _lines(n_unique: int, n_copies: int, width: int = 10) -> str:
    lines = [uniq(width, 0x4E00 + width * i) for i in range(n_unique)]
    return "\n".join(lines + lines[:n_copies])


def _sents(n_unique: int, n_copies: int, width: int = 10) -> str:
    sents = [uniq(width - 1, 0x4E00 + width * i) + "。" for i in range(n_unique)]
    return "".join(sents + sents[:n_copies])


@pytest.mark.parametrize("reason,keep_text,drop_text", [
    # 3 of 10 paragraphs are extra copies (0.30) vs 4 of 10 (0.40); widths make the in-character share differ
    ("duplicate_paragraph_fraction>0.3", _lines(7, 3), _lines(6, 4)),
    ("duplicate_paragraph_fraction_in_character>0.2", _lines(8, 2), _lines(7, 3)),
    ("duplicate_sentence_fraction>0.3", _sents(7, 3), _sents(6, 4)),
    ("duplicate_sentence_fraction_in_character>0.2", _sents(8, 2), _sents(7, 3)),
])
def test_repetition_thresholds(reason, keep_text, drop_text):
    assert reason not in reasons_of(keep_text)
    assert reason in reasons_of(drop_text)


def _top_ngram_text(n: int, k: int, pad: int) -> str:
    """`k` copies of one n-gram, each followed by a unique char, then `pad` unique chars."""
    gram = "あいうえ"[:n]
    blocks = "".join(gram + chr(0x4E00 + i) for i in range(k))
    return blocks + uniq(pad, 0x5E00)


@pytest.mark.parametrize("n,threshold,k,pad", [(2, 0.20, 20, 41), (3, 0.18, 18, 30), (4, 0.16, 16, 23)])
def test_top_ngram_thresholds(n, threshold, k, pad):
    name = f"top_{n}gram_character_fraction"
    keep = quality_features(_top_ngram_text(n, k, pad))
    drop = quality_features(_top_ngram_text(n, k, pad - 1))
    assert keep[name] == pytest.approx(threshold) and keep[name] <= threshold
    assert drop[name] > threshold
    assert f"{name}>{threshold:g}" not in quality_decision(keep)[1]
    assert f"{name}>{threshold:g}" in quality_decision(drop)[1]


@pytest.mark.parametrize("n,threshold", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_duplicate_ngram_thresholds(n, threshold):
    # seg + pad + seg: the s-n+1 n-grams inside the s-char seg repeat; distinct n-grams = s + pad
    name = f"duplicate_{n}gram_character_fraction"
    s = 12
    pad = next(m for m in range(200) if (s + 1 - n) / (s + m) <= threshold)
    texts = {m: uniq(s) + uniq(m, 0x5E00) + uniq(s) for m in (pad, pad - 1)}
    keep, drop = quality_features(texts[pad]), quality_features(texts[pad - 1])
    assert keep[name] == (s + 1 - n) / (s + pad) and drop[name] == (s + 1 - n) / (s - 1 + pad)
    assert f"{name}>{threshold:g}" not in quality_decision(keep)[1]
    assert f"{name}>{threshold:g}" in quality_decision(drop)[1]


def test_ng_fraction_threshold_and_longest_match():
    ng = NGWordMatcher(["ばか", "ばかやろう", "あほ"])
    keep = quality_features("ばか" + "あ" * 39, ng)  # 2 / 41 < 0.05
    drop = quality_features("ばか" + "あ" * 38, ng)  # 2 / 40 = 0.05 -> drop
    assert keep["ng_fraction"] == 2 / 41 and drop["ng_fraction"] == 0.05
    assert quality_decision(keep, ["ngword"]) == (True, [])
    assert quality_decision(drop, ["ngword"]) == (False, ["ng_fraction>=0.05"])
    # greedy longest match from the left, non-overlapping (reference LongestMatch.finditer)
    assert ng.matches("ばかやろうとあほあほ") == [(0, "ばかやろう"), (6, "あほ"), (8, "あほ")]
    assert NGWordMatcher(["abc", "bcdef"]).num_ng_letters("abcdef") == 3


def test_default_ng_list_is_shipped():
    ng = NGWordMatcher.default()
    assert len(ng.words) > 2000
    assert quality_decision(quality_features("普通の文章です。", ng))[1].count("ng_fraction>=0.05") == 0


def test_quality_keep_matches_full_decision():
    ng = NGWordMatcher(["ばか"])
    rng = random.Random(3)
    words = ["今日は", "天気が", "良いので", "公園へ", "散歩に", "行きました", "ばか", "。", "、", "\n", "ネコ"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        full = quality_decision(quality_features(text, ng))
        fast = quality_keep(text, ng)
        assert fast[0] == full[0] and set(fast[1]) <= set(full[1])
        assert num_japanese_letters(text) == quality_features(text)["num_japanese_letters"]


def test_rule_group_selection():
    f = quality_features("あ" * 10, NGWordMatcher(["あ"]))
    assert quality_decision(f, ["ngword"]) == (False, ["ng_fraction>=0.05"])
    assert "ng_fraction>=0.05" not in quality_decision(f, ["quality"])[1]
    with pytest.raises(ValueError):
        quality_decision(quality_features("あ"), ["ngword"])


# ---------------------------------------------------------------- cleanup
@pytest.mark.parametrize("src,expected", [
    ("この文章の句点，読点を修正します．", ("この文章の句点、読点を修正します。", True, True)),
    ("この文章の句点、読点を修正します。", ("この文章の句点、読点を修正します。", False, False)),
    ("円周率は３．１４と習いました，のように，直します．",
     ("円周率は３．１４と習いました、のように、直します。", True, True)),
    ("Ｈｉ，のように全角の英語が混ざった場合でも、できるだけ直します。",
     ("Ｈｉ，のように全角の英語が混ざった場合でも、できるだけ直します。", False, False)),
    ("お待ちください．．．", ("お待ちください。。。", False, True)),
])
def test_kutoten_normalization(src, expected):
    assert normalize_kutoten(src) == expected


def test_footer_trimmed_only_in_last_lines():
    body = "\n".join(f"本文の{i}行目です。" for i in range(12))
    assert trim_footer(body + "\nCopyright 2020 All rights reserved") == body
    # a footer-like line earlier than the last 10 lines is kept
    early = "Copyright All rights reserved\n" + body
    assert trim_footer(early) == early
    # <= 30% footer characters: kept
    line = "最後の段落ですが、サイトという語をひとつだけ含んでいます"  # 3 of 28 characters
    assert trim_footer(body + "\n" + line) == body + "\n" + line
    assert trim_footer(body + "\nサイトマップ") == body  # 3 of 6 characters > 30%


# ---------------------------------------------------------------- batch API == per-document API, exactly
def _assert_batch_equals_per_doc(texts, ng=None):
    batch = quality_features_batch(texts, ng)
    assert len(batch) == len(texts)
    for text, got in zip(texts, batch):
        want = quality_features(text, ng)
        assert got == want, repr(text[:80])
        assert list(got) == list(want)  # same key order (annotate writes the dict as JSON)
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


@pytest.mark.skipif(not (SHARED / "quality-agreement" / "corpus_heldout.jsonl").is_file(),
                    reason="shared/data/quality-agreement not present")
def test_batch_equals_per_document_on_shared_corpus():
    path = SHARED / "quality-agreement" / "corpus_heldout.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    ng = NGWordMatcher.default()
    per_doc = [quality_features(t, ng) for t in texts]
    assert quality_features_batch(texts, ng) == per_doc  # one call: 3,233 documents
    chunked = [f for i in range(0, len(texts), 100) for f in quality_features_batch(texts[i:i + 100], ng)]
    assert chunked == per_doc
    assert sum(f["num_ng_letters"] for f in per_doc) > 0


def test_batch_edge_cases():
    ng = NGWordMatcher.default()
    assert quality_features_batch([], ng) == []
    _assert_batch_equals_per_doc([""], ng)
    _assert_batch_equals_per_doc(["あ"], ng)
    _assert_batch_equals_per_doc(["", "あ", "", "ab", "abc", "", "x"], ng)
    _assert_batch_equals_per_doc(["𠮷𠮷𠮷。𠮷𠮷", "a𠮷a𠮷a𠮷\n𠮷", "\U0010ffff" * 12, "\x00\x00\x00a\x00", "\ud800\udc00x"], ng)
    _assert_batch_equals_per_doc(["あいう" * 400, "ab" * 5000, uniq(50) * 3, "。。！？\n。abc。"], ng)
    # > 8,191 distinct characters in the batch (wider keys) with a long, highly repetitive document beside them
    _assert_batch_equals_per_doc([uniq(9000, 0x4E00) + "ab" * 3000, "ab" * 3000 + "c", uniq(300) * 20])
    # > 65,535 distinct characters in the batch (per-document fallback)
    wide = "".join(chr(0x20000 + i) for i in range(70000))
    _assert_batch_equals_per_doc([wide[:40000], wide[30000:] + wide[30000:30010], "あい" * 5])


def test_batch_on_random_strings_with_ng_words():
    rng = random.Random(11)
    ng = NGWordMatcher(["あ", "あい", "いあい", "漢。", "𠮷あ", "ア\nア", "aa", "a𠮷"])
    alphabet = ["あ", "い", "ア", "漢", "。", "、", "\n", "…", "a", "𠮷", "\uffff", "\x00", "！", "?", "．"]
    for _ in range(200):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 8))]
        _assert_batch_equals_per_doc(texts, ng)
        assert ng.num_ng_letters_batch(texts) == [ng.num_ng_letters(t) for t in texts]
    assert NGWordMatcher([]).num_ng_letters_batch(["abc", ""]) == [0, 0]
