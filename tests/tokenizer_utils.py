"""Shared builders for the tokenizer / indexed-data / expand-vocab tests (tiny, made in the test, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Continual pretraining adapts a language model to a new language without starting from scratch.",
    "Tokenizers split text into pieces; each piece has an id in the vocabulary.",
    "The weather today is sunny, and tomorrow it will rain in the afternoon.",
    "Large language models are trained on trillions of tokens of web text.",
    "Please read the documentation before you open an issue on the tracker.",
    "Numbers like 12345 and 2024 are split into single digits by Llama tokenizers.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
]

JAPANESE = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "東京都は日本の首都であり、人口は約千四百万人である。",
    "大規模言語モデルの継続事前学習では、日本語のウェブコーパスを用いた。",
    "本日は晴天なり。明日の天気予報によると、関東地方では午後から雨が降る見込みです。",
    "機械学習の研究者たちは、計算資源の効率的な利用方法について議論を重ねている。",
    "日本語の文章を読みやすくするために、句読点の使い方に注意しましょう。",
    "新しい語彙を追加すると、日本語の文章を少ないトークンで表現できるようになる。",
    "京都の寺院を訪れる観光客は、春と秋に特に多くなる。",
]


def english_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(ENGLISH, 2)) for _ in range(n)]


def japanese_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.sample(JAPANESE, 3)) for _ in range(n)]


def make_base_tokenizer(out_dir: Path, vocab_size: int = 420) -> Path:
    """A Llama-style (BPE, byte fallback, identity) SentencePiece model trained on English, with HF files."""
    import sentencepiece as spm

    from data_pipeline.tokenizer.spm import export_hf_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english_lines()), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (out_dir / "tokenizer.vocab").unlink()
    export_hf_tokenizer(out_dir / "tokenizer.model", out_dir)
    return out_dir


def write_corpus(path: Path, texts: list[str]) -> Path:
    from hibari.io import write_jsonl

    write_jsonl(path, ({"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)))
    return path
