"""Document filters of the Swallow recipe as pure functions (no I/O, no state beyond loaded word lists).

    quality_features(text, ng_matcher=None) -> dict      # exact Swallow feature names
    quality_features_batch(texts, ng_matcher=None) -> list[dict]   # same, many documents per numpy call
    quality_decision(features, rules=None) -> (keep, reasons)
    quality_keep(text, ng_matcher=None) -> (keep, reasons)   # same keep, skips work once a rule fired
    NGWordMatcher.default() / NGWordMatcher.from_files(paths)
    normalize_kutoten(text) -> (text, toten_changed, kuten_changed);  trim_footer(text) -> text
"""

from data_pipeline.filters.cleanup import footer_ratio, load_footer_words, normalize_kutoten, trim_footer
from data_pipeline.filters.ngword import DEFAULT_NG_FILES, NGWordMatcher, read_word_files
from data_pipeline.filters.quality import num_japanese_letters, quality_features, quality_features_batch, quality_keep
from data_pipeline.filters.quality_ngrams import ngram_statistics
from data_pipeline.filters.quality_rules import (FEATURE_NAMES, NG_FEATURE_NAMES, NG_RULES, QUALITY_RULES, RULE_GROUPS,
                                                 quality_decision)

__all__ = [
    "FEATURE_NAMES", "NG_FEATURE_NAMES", "NG_RULES", "QUALITY_RULES", "RULE_GROUPS", "DEFAULT_NG_FILES",
    "NGWordMatcher", "read_word_files", "ngram_statistics", "num_japanese_letters", "quality_decision",
    "quality_features", "quality_features_batch", "quality_keep",
    "footer_ratio", "load_footer_words", "normalize_kutoten", "trim_footer",
]
