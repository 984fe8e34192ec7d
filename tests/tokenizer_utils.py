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


# -- byte-level BPE (Llama 3 / Qwen / Mistral-Nemo style tokenizer.json) ----------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_2|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def english_corpus_texts() -> list[str]:
    """The demo's English documents (ASCII prose, committed in the repo) for training a base BPE."""
    import json

    import zstandard

    path = Path(__file__).resolve().parents[1] / "launch" / "demo_data" / "english.jsonl.zst"
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=10_000_000).decode("utf-8")
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()] + english_lines(200)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_qwen_style_tokenizer(out_dir: Path, vocab_size: int = 800) -> Path:
    """A Qwen2-style tokenizer dir trained on English: NFC normalizer, single-digit split, no ignore_merges, no BOS,
    special tokens after the vocabulary, GPT-2 style vocab.json/merges.txt next to tokenizer.json, and
    tokenizer_class Qwen2Tokenizer (transformers builds it from those files)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(english_corpus_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(QWEN2_SPECIALS)
    tok.save(str(out_dir / "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in model["merges"]) + "\n",
                                        encoding="utf-8")
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "errors": "replace", "clean_up_tokenization_spaces": False,
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}",
              "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                                   "rstrip": False, "single_word": False,
                                                                   "special": True} for t in QWEN2_SPECIALS}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return out_dir


def make_bpe_base_tokenizer(out_dir: Path, vocab_size: int = 1000) -> Path:
    """A Llama-3-style tokenizer dir trained on English: byte-level BPE with the Llama 3 split regex and
    ignore_merges, special tokens with ids right AFTER the BPE vocabulary, a BOS template post-processor, and a
    tokenizer_config.json with bos/eos and a chat template (loads as PreTrainedTokenizerFast)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(english_corpus_texts(), trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "model_input_names": ["input_ids", "attention_mask"], "chat_template": LLAMA3_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                                   "rstrip": False, "single_word": False,
                                                                   "special": True} for t in LLAMA3_SPECIALS}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, indent=1), encoding="utf-8")
    return out_dir
