"""Vocabulary expansion for byte-level BPE `tokenizer.json` tokenizers (Llama 3, Qwen, Mistral-Nemo style).

BPE training is CONTINUED from the base: the corpus is normalized and pre-tokenized with the base tokenizer's own
normalizer and pre-tokenizer, each distinct pre-token is encoded into base tokens by the base BPE model, and new
merges are learned greedily on those base segmentations (data_pipeline.tokenizer.bpe_merges). The new tokens get
ids after the largest existing id (after Llama 3's special tokens 128000-128255, for example) and the new merges are
ranked after every base merge. Added/special tokens, post-processor, decoder and chat template are kept.

Why base encodings cannot change for pure-ASCII text: every new merge has a side containing a byte >= 0x80, so every
new token does too. A pure-ASCII text pre-tokenizes into pure-ASCII pre-tokens (byte-level maps bytes one to one);
inside such a pre-token every symbol stays pure ASCII, so no new merge ever matches and no new token equals the
whole pre-token (`ignore_merges`). Base merges all rank before new ones and never involve a new token, so the base
segmentation of ANY pre-token is reached first and the new merges only continue from it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from hibari.errors import HibariError

META_FILE = "hibari_tokenizer.json"
# tokenizer files copied unchanged from the base dir (ids of added/special tokens never change)
COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")

BUILTIN_EN_SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Continual pretraining adapts a language model to Japanese without forgetting English.",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 100% ASCII",
    "See https://example.com/docs?page=2&lang=en for details, or e-mail info@example.org.",
    "In 2024, the model was trained on 15,000,000,000,000 tokens at $2.50/GPU-hour.",
    "  Indented line with trailing spaces   \n\n\tand a tab; (parentheses) [brackets] {braces}",
    "I'm sure they'll say it's fine, but we've seen what you'd do.",
]


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by the ByteLevel pre-tokenizer and decoder."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _non_ascii_re() -> re.Pattern:
    """Matches a byte-level character standing for a byte >= 0x80."""
    return re.compile("[" + "".join(re.escape(byte_to_char()[b]) for b in range(128, 256)) + "]")


# -- the base tokenizer --------------------------------------------------------------------------------------------
def tokenizer_kind(base: str | Path) -> str:
    """'sentencepiece' or 'bpe' by what `base` (a tokenizer dir or file) contains."""
    path = Path(base)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return "sentencepiece"
        if (path / "tokenizer.json").is_file():
            return "bpe"
        raise HibariError(f"--base {path}: no tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE) in it")
    if path.is_file():
        return "bpe" if path.suffix == ".json" else "sentencepiece"
    raise HibariError(f"--base {path}: no such tokenizer dir or file")


def _has_byte_level(component) -> bool:
    if not isinstance(component, dict):
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("pretokenizers") or component.get("decoders") or []
    return any(_has_byte_level(p) for p in parts)


def load_bpe_json(base: str | Path) -> tuple[Path, dict]:
    """(path of tokenizer.json, its parsed content), checked to be a byte-level BPE with merges."""
    path = Path(base)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise HibariError(f"{path}: tokenizer.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HibariError(f"{path}: not a tokenizer.json ({err})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise HibariError(f"{path}: not a tokenizer.json (no \"model\" object)")
    kind = model.get("type") or ("BPE" if "merges" in model else None)
    if kind != "BPE":
        raise HibariError(f"{path}: model type {kind}: expected a byte-level BPE tokenizer (Llama 3 / Qwen / "
                          f"Mistral-Nemo style); WordPiece and Unigram tokenizers cannot be expanded by merges")
    if not model.get("merges"):
        raise HibariError(f"{path}: the BPE model has no merges: nothing to continue training from")
    if not _has_byte_level(data.get("pre_tokenizer")):
        raise HibariError(f"{path}: BPE without a ByteLevel pre-tokenizer (SentencePiece-style?): expected a "
                          f"byte-level BPE; for a Llama 2 / Mistral v0.1 tokenizer pass the dir with tokenizer.model")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise HibariError(f"{path}: BPE with a subword prefix/suffix is not a byte-level BPE of the Llama 3 kind")
    return path, data


def _tokenizer_from(data: dict):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    except Exception as err:  # noqa: BLE001 - the Rust loader raises plain Exception
        raise HibariError(f"tokenizer.json does not load with the tokenizers library ({err})") from None


def _model_only(data: dict):
    """The base BPE model alone: a byte-level string in, base ids out (no normalizer, pre-tokenizer, specials)."""
    bare = dict(data, normalizer=None, pre_tokenizer=None, post_processor=None, decoder=None, added_tokens=[],
                truncation=None, padding=None)
    return _tokenizer_from(bare)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def all_ids(data: dict) -> set[int]:
    return set(data["model"]["vocab"].values()) | {t["id"] for t in data.get("added_tokens", [])}


# -- the corpus ----------------------------------------------------------------------------------------------------
def read_corpus_lines(inputs, text_key: str, counters: dict, bar=None, split: str | None = None,
                      text_format: str = "line") -> Iterator[str]:
    """The corpus as text lines (the one place that reads --corpus; lines are short enough to pre-tokenize)."""
    from data_pipeline.readers import resolve_inputs
    from data_pipeline.tokenizer.spm import iter_training_lines

    sources = resolve_inputs(inputs, split=split, text_format=text_format)  # bad inputs fail here, before work

    def lines() -> Iterator[str]:
        yield from iter_training_lines(sources, text_key, False, 1 << 24, counters, bar)
        if "error" in counters:  # iter_training_lines stores a reading error instead of raising it
            raise counters["error"]

    return lines()


def count_pretokens(tok, lines: Iterable[str]) -> Counter:
    """Frequency of every pre-token (byte-level strings) under the base normalizer and pre-tokenizer."""
    normalizer, pre = tok.normalizer, tok.pre_tokenizer
    counts: Counter = Counter()
    for line in lines:
        if normalizer is not None:
            line = normalizer.normalize_str(line)
        counts.update(piece for piece, _ in pre.pre_tokenize_str(line))
    return counts


# -- expansion -----------------------------------------------------------------------------------------------------
def expand_bpe_json(data: dict, pretoken_counts: Counter, num_new_tokens: int, min_frequency: int = 2,
                    show_progress: bool = False) -> tuple[dict, dict]:
    """Continue BPE training of `data` (a parsed tokenizer.json) on pre-token counts. Returns (new data, stats)."""
    from data_pipeline.tokenizer.bpe_merges import learn_merges
    from hibari.progress import progress_bar

    vocab: dict[str, int] = dict(data["model"]["vocab"])
    id_to_token = {i: t for t, i in vocab.items()}
    high = _non_ascii_re()
    non_ascii = {i for t, i in vocab.items() if high.search(t)}
    words = [w for w in pretoken_counts if high.search(w)]  # pure-ASCII pre-tokens can never merge anew
    freqs = [pretoken_counts[w] for w in words]
    encoded = [e.ids for e in _model_only(data).encode_batch(words, add_special_tokens=False)] if words else []
    first_new_id = max(all_ids(data)) + 1
    with progress_bar(num_new_tokens, "learn merges", unit="tokens", enabled=show_progress) as bar:
        res = learn_merges(encoded, freqs, id_to_token, vocab, non_ascii, first_new_id, num_new_tokens,
                           min_frequency=min_frequency, progress=bar)
    out = json.loads(json.dumps(data))
    model = out["model"]
    # The tokenizers library re-numbers an added token that is not in the model vocabulary from the MODEL vocabulary
    # size on load (it keeps the stored id only when model size == that id), so with new tokens after them the
    # special tokens would move. Listing them in the model vocabulary too pins their ids. No merge yields them, and
    # added tokens are matched before the model sees the text (only a caller that disables that matching, e.g.
    # transformers' split_special_tokens=True, with a pre-tokenizer that keeps "<|eot_id|>" whole, could differ).
    for added in data.get("added_tokens", []):
        model["vocab"].setdefault(added["content"], added["id"])
    for text, i in res.new_tokens:
        model["vocab"][text] = i
    as_strings = isinstance(model["merges"][0], str)
    for a, b in res.merges:
        pair = (id_to_token[a], id_to_token[b])
        model["merges"].append(" ".join(pair) if as_strings else list(pair))
    stats = {"base_vocab_size": first_new_id, "base_model_tokens": len(data["model"]["vocab"]),
             "base_merges": len(data["model"]["merges"]), "added_tokens": len(res.new_tokens),
             "merges_learned": len(res.merges), "merged_into_existing": res.merged_into_existing,
             "stopped_early": res.stopped_early, "last_merge_count": res.last_count,
             "vocab_size": first_new_id + len(res.new_tokens),
             "pretoken_types": len(pretoken_counts), "pretokens": sum(pretoken_counts.values()),
             "non_ascii_pretoken_types": len(words)}
    return out, stats


def _write_slow_files(out: Path, base_dir: Path, data: dict) -> list[str]:
    """Regenerate GPT-2-style vocab.json / merges.txt when the base ships them, so no stale copy disagrees."""
    written = []
    if (base_dir / "vocab.json").is_file():
        (out / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
        written.append("vocab.json")
    if (base_dir / "merges.txt").is_file():
        lines = ["#version: 0.2"] + [" ".join(p) for p in _merge_pairs(data["model"]["merges"])]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append("merges.txt")
    return written


def _check_base_ids_kept(base_tok, new_tok, base_path: Path) -> None:
    """Every token of the base (model vocabulary and added tokens) has its id in the written tokenizer."""
    new_vocab = new_tok.get_vocab(with_added_tokens=True)
    moved = [(t, i, new_vocab.get(t)) for t, i in base_tok.get_vocab(with_added_tokens=True).items()
             if new_vocab.get(t) != i]
    if moved:
        t, i, j = moved[0]
        raise HibariError(f"expanding {base_path} would move {len(moved)} base token(s), e.g. {t!r} {i} -> {j} "
                          f"(the base tokenizer.json's ids are inconsistent?)")


def compare_on_samples(base_tok, new_tok, ja_texts: list[str], en_texts: list[str]) -> dict:
    """Characters per token before/after on Japanese, exact round trips, and identical English encodings."""
    def ids(tok, texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    ja_chars = sum(len(t) for t in ja_texts)
    ja_before, ja_after = ids(base_tok, ja_texts), ids(new_tok, ja_texts)
    round_trips = sum(new_tok.decode(i, skip_special_tokens=False) == t for i, t in zip(ja_after, ja_texts))
    en_before, en_after = ids(base_tok, en_texts), ids(new_tok, en_texts)
    return {"sample_texts": len(ja_texts),
            "chars_per_token_before": round(ja_chars / max(sum(map(len, ja_before)), 1), 4),
            "chars_per_token_after": round(ja_chars / max(sum(map(len, ja_after)), 1), 4),
            "sample_round_trips": round_trips,
            "english_texts": len(en_texts), "english_unchanged": sum(a == b for a, b in zip(en_before, en_after)),
            "english_tokens": sum(map(len, en_before))}


def expand_bpe_tokenizer(base: str | Path, corpus, num_new_tokens: int, out_dir: str | Path,
                         pad_to_multiple: int = 8, min_frequency: int = 2, sample=None, english_sample=None,
                         text_key: str = "text", split: str | None = None, text_format: str = "line",
                         show_progress: bool = True) -> dict:
    """`hibari tokenizer expand` for a byte-level BPE base: learn merges on `corpus`, write the tokenizer to out."""
    from data_pipeline.tokenizer.spm import read_sample_texts
    from hibari.io import ensure_writable_dir
    from hibari.progress import progress_bar

    if num_new_tokens < 1:
        raise HibariError(f"--add-tokens {num_new_tokens}: expected a positive number of new tokens")
    if pad_to_multiple < 1:
        raise HibariError(f"--pad-to-multiple {pad_to_multiple}: expected a positive integer")
    if min_frequency < 2:
        raise HibariError(f"--min-frequency {min_frequency}: expected at least 2 (a pair seen once is no token)")
    base_path, data = load_bpe_json(base)
    base_tok = _tokenizer_from(data)
    ja_texts = read_sample_texts(sample, text_key, split=split, text_format=text_format)
    en_texts = (read_sample_texts(english_sample, text_key, split=split, text_format=text_format)
                if english_sample else list(BUILTIN_EN_SAMPLE))
    counters = {"documents": 0, "lines": 0, "skipped_empty": 0, "skipped_long_lines": 0,
                "skipped_undecodable_lines": 0}
    t0 = time.perf_counter()
    with progress_bar(None, "pre-tokenize corpus", unit="docs", enabled=show_progress) as bar:
        lines = read_corpus_lines(corpus, text_key, counters, bar, split, text_format)
        out = ensure_writable_dir(out_dir)
        counts = count_pretokens(base_tok, lines)
    if counters["lines"] == 0:
        raise HibariError(f"--corpus {corpus!r}: no text to learn merges from (key {text_key!r} empty or missing)")
    new_data, stats = expand_bpe_json(data, counts, num_new_tokens, min_frequency, show_progress)
    if stats["added_tokens"] == 0:
        raise HibariError(f"--corpus {corpus!r}: no pair of non-ASCII tokens occurs {min_frequency} times in "
                          f"{counters['lines']:,} lines; nothing to add (is the corpus Japanese text?)")
    new_tok = _tokenizer_from(new_data)
    _check_base_ids_kept(base_tok, new_tok, base_path)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats.update(counters)
    stats.update(compare_on_samples(base_tok, new_tok, ja_texts, en_texts))
    n = stats["vocab_size"]
    stats.update({"kind": "byte_level_bpe", "base": str(base_path.parent.resolve()), "requested_tokens":
                  num_new_tokens, "min_frequency": min_frequency, "pad_to_multiple": pad_to_multiple,
                  "padded_vocab_size": -(-n // pad_to_multiple) * pad_to_multiple})

    (out / "tokenizer.json").write_text(json.dumps(new_data, ensure_ascii=False), encoding="utf-8")
    base_dir = base_path.parent
    stats["copied_files"] = [name for name in COPIED_FILES if (base_dir / name).is_file()]
    for name in stats["copied_files"]:
        (out / name).write_bytes((base_dir / name).read_bytes())
    stats["copied_files"] += _write_slow_files(out, base_dir, new_data)
    # an --overwrite'n dir may hold files of an earlier expansion: a stale tokenizer.model would even take precedence
    # over tokenizer.json in every loader, so whatever this base does not ship goes
    for name in ("tokenizer.model", "vocab.json", "merges.txt") + COPIED_FILES:
        if name not in stats["copied_files"] and (out / name).is_file():
            (out / name).unlink()
    (out / META_FILE).write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
    return stats
