"""SentencePiece training, Swallow-style vocabulary merge, and Hugging Face export.

Llama/Mistral conventions are kept throughout: BPE with byte fallback, digits split, identity normalization inside
the model (text may be NFKC-normalized BEFORE training, as Swallow did, but a model with an NFKC normalizer converts
to an HF tokenizer that disagrees with SentencePiece), a dummy prefix and no whitespace squeezing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from hibari.errors import HibariError

META_FILE = "hibari_tokenizer.json"  # sizes and provenance written next to tokenizer.model

# a few Japanese sentences for the characters-per-token report when no --sample is given
BUILTIN_JA_SAMPLE = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "東京都は日本の首都であり、人口は約1400万人で、世界有数の大都市圏を形成している。",
    "大規模言語モデルの継続事前学習では、日本語のウェブコーパスを用いて語彙を拡張した。",
    "本日は晴天なり。明日の天気予報によると、関東地方では午後から雨が降る見込みです。",
    "機械学習の研究者たちは、計算資源の効率的な利用方法について議論を重ねている。",
]


def _pb():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as err:  # protobuf missing
        raise HibariError(f"editing SentencePiece models needs the protobuf package ({err})") from None
    return pb


def load_model_proto(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise HibariError(f"{path}: SentencePiece model not found")
    proto = _pb().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError
        raise HibariError(f"{path}: not a SentencePiece model ({err})") from None
    if not proto.pieces:
        raise HibariError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def resolve_model_file(path: str | Path) -> Path:
    """A tokenizer dir (with tokenizer.model) or a .model file -> the .model path."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise HibariError(f"{path}: SentencePiece model not found (expected a dir with tokenizer.model or a .model)")
    return path


def iter_training_lines(files: Iterable, text_key: str, nfkc: bool, max_bytes: int, counters: dict,
                        bar=None) -> Iterator[str]:
    """Non-empty lines of every document (SentencePiece trains on sentences; documents are too long). `files`:
    document sources of `data_pipeline.readers` (or file paths); a reading error is stored in
    counters["error"] and ends the iteration (an exception inside SentencePiece's iterator would be lost)."""
    from data_pipeline.readers import iter_texts

    try:
        yield from _training_lines(files, text_key, nfkc, max_bytes, counters, bar, iter_texts)
    except HibariError as err:
        counters["error"] = err


def _training_lines(files, text_key, nfkc, max_bytes, counters, bar, iter_texts) -> Iterator[str]:
    for f in files:
        for text in iter_texts(f, text_key):
            counters["documents"] += 1
            if bar is not None:
                bar.advance()
            if not isinstance(text, str) or not text.strip():
                counters["skipped_empty"] += 1
                continue
            if nfkc:
                text = unicodedata.normalize("NFKC", text)
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    n = len(line.encode("utf-8"))
                except UnicodeEncodeError:
                    counters["skipped_undecodable_lines"] += 1
                    continue
                if n > max_bytes:
                    counters["skipped_long_lines"] += 1
                    continue
                counters["lines"] += 1
                yield line


def train_tokenizer(inputs, vocab_size: int, out_dir: str | Path, model_type: str = "bpe",
                    normalization: str = "identity", max_sentences: int = 2_000_000, threads: int = 1,
                    text_key: str = "text", character_coverage: float = 0.9995, show_progress: bool = True,
                    split: str | None = None, text_format: str = "line") -> dict:
    """Train a Llama-style SentencePiece model on corpus shards; write tokenizer.model + HF files to `out_dir`."""
    import sentencepiece as spm

    from data_pipeline.readers import resolve_inputs
    from hibari.io import ensure_writable_dir
    from hibari.progress import progress_bar

    if model_type not in ("bpe", "unigram"):
        raise HibariError(f"--model-type {model_type!r}: expected bpe or unigram")
    if normalization not in ("identity", "nfkc"):
        raise HibariError(f"--normalization {normalization!r}: expected identity or nfkc")
    if vocab_size < 300:
        raise HibariError(f"--vocab-size {vocab_size}: too small (byte fallback alone needs 259 pieces)")
    files = resolve_inputs(inputs, split=split, text_format=text_format)
    out = ensure_writable_dir(out_dir)
    counters = {"documents": 0, "lines": 0, "skipped_empty": 0, "skipped_long_lines": 0,
                "skipped_undecodable_lines": 0}
    max_bytes = 16384
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        prefix = str(Path(tmp) / "spm")
        with progress_bar(None, "read training text", unit="docs", enabled=show_progress) as bar:
            lines = iter_training_lines(files, text_key, normalization == "nfkc", max_bytes, counters, bar)
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=lines, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                    byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                    character_coverage=character_coverage, input_sentence_size=max_sentences,
                    shuffle_input_sentence=True, max_sentence_length=max_bytes, num_threads=max(1, threads),
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentencepiece_length=16, minloglevel=2)
            except RuntimeError as err:
                if "error" in counters:
                    raise counters["error"] from None
                if counters["lines"] == 0:
                    raise HibariError(f"input {inputs!r}: no text to train on (key {text_key!r} empty or missing)") \
                        from None
                raise HibariError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
        if "error" in counters:
            raise counters["error"]
        if counters["lines"] == 0:
            raise HibariError(f"input {inputs!r}: no text to train on (key {text_key!r} empty or missing)")
        model_path = out / "tokenizer.model"
        shutil.copyfile(prefix + ".model", model_path)
    meta = {"vocab_size": vocab_size, "model_type": model_type, "text_normalization": normalization,
            "max_sentences": max_sentences, **counters}
    export_hf_tokenizer(model_path, out, meta)
    return meta


def expand_model(base_model: str | Path, add_model: str | Path):
    """Append `add_model`'s normal pieces missing from `base_model`. Returns (merged proto, stats).

    Every base piece keeps its id, score and type, and the base normalizer is kept. New pieces get scores below
    every base piece, in the add model's order, so BPE merges of the base vocabulary keep their priority.
    """
    pb = _pb()
    base = load_model_proto(base_model)
    add = load_model_proto(add_model)
    if base.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise HibariError(f"{base_model}: base tokenizer must be a BPE SentencePiece model (Llama/Mistral style)")
    normal = pb.ModelProto.SentencePiece.NORMAL
    existing = {p.piece for p in base.pieces}
    candidates = [p for p in add.pieces if p.type == normal]
    new = [p for p in sorted(candidates, key=lambda p: -p.score) if p.piece not in existing]
    min_score = min((p.score for p in base.pieces if p.type == normal), default=0.0)
    for rank, p in enumerate(new):
        piece = base.pieces.add()
        piece.piece = p.piece
        piece.score = min_score - 1.0 - rank
        piece.type = normal
    base_size = len(base.pieces) - len(new)
    base.trainer_spec.vocab_size = len(base.pieces)
    stats = {"base_vocab_size": base_size, "add_vocab_size": len(add.pieces), "added_pieces": len(new),
             "skipped_present": len(candidates) - len(new), "vocab_size": len(base.pieces)}
    return base, stats


def read_sample_texts(sample: str | list[str] | None, text_key: str = "text", limit: int = 2000,
                      split: str | None = None, text_format: str = "line") -> list[str]:
    if not sample:
        return list(BUILTIN_JA_SAMPLE)
    from data_pipeline.readers import iter_texts, resolve_inputs

    texts: list[str] = []
    for source in resolve_inputs(sample, split=split, text_format=text_format):
        for text in iter_texts(source, text_key):
            if isinstance(text, str) and text.strip():
                texts.append(text)
            if len(texts) >= limit:
                return texts
    return texts


def chars_per_token(model_file: str | Path, texts: list[str]) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens = sum(len(sp.encode(t)) for t in texts)
    return sum(len(t) for t in texts) / max(tokens, 1)


def expand_tokenizer(base: str | Path, add: str | Path, out_dir: str | Path, pad_to_multiple: int = 8,
                     sample: str | list[str] | None = None, text_key: str = "text", split: str | None = None,
                     text_format: str = "line") -> dict:
    from hibari.io import ensure_writable_dir

    if pad_to_multiple < 1:
        raise HibariError(f"--pad-to-multiple {pad_to_multiple}: expected a positive integer")
    base_file, add_file = resolve_model_file(base), resolve_model_file(add)
    merged, stats = expand_model(base_file, add_file)
    out = ensure_writable_dir(out_dir)
    model_path = out / "tokenizer.model"
    model_path.write_bytes(merged.SerializeToString())
    n = stats["vocab_size"]
    stats["pad_to_multiple"] = pad_to_multiple
    stats["padded_vocab_size"] = -(-n // pad_to_multiple) * pad_to_multiple
    texts = read_sample_texts(sample, text_key, split=split, text_format=text_format)
    stats["sample_texts"] = len(texts)
    stats["chars_per_token_before"] = round(chars_per_token(base_file, texts), 4)
    stats["chars_per_token_after"] = round(chars_per_token(model_path, texts), 4)
    stats["base"] = str(base_file)
    stats["add"] = str(add_file)
    # the base dir's special-token settings (bos/eos/unk) carry over when it has a tokenizer_config.json
    export_hf_tokenizer(model_path, out, stats)
    return stats


def export_hf_tokenizer(model_file: str | Path, out_dir: str | Path, meta: dict | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json so `AutoTokenizer.from_pretrained(out_dir)` matches SentencePiece.

    transformers' Llama tokenizer rebuilds its pre-tokenizer (Metaspace, prepend_scheme="first"), which drops the
    dummy prefix when a text already starts with a space and so disagrees with SentencePiece. We convert once with
    transformers, then store the legacy Llama-2 normalizer (Prepend "▁" + Replace " " -> "▁", no pre-tokenizer)
    and load it as a plain fast tokenizer, which reproduces SentencePiece ids exactly (tested).
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    model_file = Path(model_file)
    proto = load_model_proto(model_file)
    spec = proto.normalizer_spec
    pieces = proto.pieces
    specials = {"unk_token": pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None,
                "bos_token": pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None,
                "eos_token": pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
             **{k: v for k, v in specials.items() if v}}), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp)
        tj = json.loads(tok.backend_tokenizer.to_str())
    normalizers = []
    if spec.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    tj["normalizer"] = {"type": "Sequence", "normalizers": normalizers}
    tj["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 1 << 30,
              **{k: v for k, v in specials.items() if v}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if v}, indent=1),
                                                 encoding="utf-8")
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
