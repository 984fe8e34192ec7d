"""Load a tokenizer directory once per process and encode documents to token ids.

A directory holding `tokenizer.model` is encoded with SentencePiece directly (~2.5x faster than the HF fast
tokenizer per core, see library-pitfalls); otherwise `transformers.AutoTokenizer` is used. hibari's own tokenizer
directories carry both, and their tests check that the two give identical ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hibari.errors import HibariError


@dataclass
class TextEncoder:
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    encode: Callable[[str], list[int]]  # without BOS/EOS
    # several texts at once -> one id sequence (list or numpy array) per text; None: call `encode` per text
    encode_batch: Callable[[list[str]], list] | None = None


_CACHE: dict[str, TextEncoder] = {}


def load_encoder(tokenizer_dir: str | Path) -> TextEncoder:
    key = str(Path(tokenizer_dir).resolve())
    if key in _CACHE:
        return _CACHE[key]
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise HibariError(f"tokenizer {path}: not a directory (expected a dir with tokenizer.model or tokenizer.json)")
    spm_file = path / "tokenizer.model"
    if spm_file.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        bos, eos = sp.bos_id(), sp.eos_id()
        try:  # numpy output: sentencepiece >= 0.2.1
            sp.encode(["a"], num_threads=1, out_type="numpy")
            batch_kwargs = {"num_threads": 1, "out_type": "numpy"}
        except (TypeError, ValueError):
            batch_kwargs = {"num_threads": 1}

        def encode_batch(texts: list[str], _sp=sp) -> list:  # one C++ call for the batch, no Python int lists
            return _sp.encode(texts, **batch_kwargs)

        enc = TextEncoder(f"sentencepiece:{spm_file}", sp.get_piece_size(), bos if bos >= 0 else None,
                          eos if eos >= 0 else None, sp.encode, encode_batch)
    elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001 - any loader failure is a bad tokenizer dir for the user
            raise HibariError(f"tokenizer {path}: cannot load with transformers ({type(err).__name__}: {err})") \
                from None

        def encode(text: str, _tok=tok) -> list[int]:
            return _tok.encode(text, add_special_tokens=False)

        bos, eos = _special_id(path, tok, "bos_token"), _special_id(path, tok, "eos_token")
        enc = TextEncoder(f"hf:{path}", len(tok), bos, eos, encode)
    else:
        raise HibariError(f"tokenizer {path}: no tokenizer.model or tokenizer.json in it")
    _CACHE[key] = enc
    return enc


def _special_id(path: Path, tok, name: str) -> int | None:
    """BOS/EOS id as tokenizer_config.json names it (a string or an AddedToken dict; null = none, as Qwen's BOS).

    Byte-level BPE dirs (Llama 3, Qwen, Mistral-Nemo) keep their special tokens only there; a named token that is
    not in the vocabulary is an error rather than a silently missing BOS/EOS."""
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return getattr(tok, f"{name}_id")
    import json

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HibariError(f"{config_file}: not valid JSON ({err})") from None
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    token_id = None
    if isinstance(value, str):
        if (path / "tokenizer.json").is_file():  # transformers would ADD a missing special token: ask the file
            from tokenizers import Tokenizer

            token_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(value)
        else:
            token_id = tok.convert_tokens_to_ids(value)
            if token_id == tok.unk_token_id and value != tok.unk_token:
                token_id = None
    if token_id is None:
        raise HibariError(f"{config_file}: {name} {value!r} is not a token of this tokenizer")
    return token_id
