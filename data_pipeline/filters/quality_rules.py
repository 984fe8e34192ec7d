"""The Swallow quality rules (`apply_v1`): rule tables, feature names, and the keep decision on computed features."""

from __future__ import annotations

import operator

from data_pipeline.filters.quality_ngrams import NGRAM_DUP_RANGE, NGRAM_TOP_RANGE

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
