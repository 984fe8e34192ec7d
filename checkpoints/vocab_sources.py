"""Which ORIGINAL token ids each new token of an expanded tokenizer is made of (for Swallow's mean init).

Two tokenizer kinds, told apart by the files of the expanded tokenizer dir:
- SentencePiece (`tokenizer.model`, Llama 2 / Mistral v0.1): a new piece's text is split by the base model with the
  dummy-prefix space switched off, so the piece's text is split as it stands.
- byte-level BPE (`tokenizer.json`, Llama 3 / Qwen / Mistral-Nemo): a new token's byte-level string is split by the
  base BPE model alone (no pre-tokenizer, no special tokens), i.e. the base tokens its bytes decode to.

Every base token must keep its id in the expanded tokenizer; anything else is a one-line error. This module reads
tokenizer files with sentencepiece/tokenizers directly (checkpoints does not import data_pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hibari.errors import HibariError

META_FILE = "hibari_tokenizer.json"  # written by `hibari tokenizer expand` next to the expanded tokenizer


@dataclass
class VocabExpansion:
    kind: str  # "sentencepiece" | "bpe"
    base_file: Path
    new_file: Path
    base_size: int  # ids < base_size are the original tokenizer's
    new_size: int  # ids < new_size exist in the expanded tokenizer
    sources: dict[int, list[int]]  # new id -> original ids whose mean initialises its rows
    meta: dict


def tokenizer_file(path: str | Path, where: str) -> tuple[str, Path]:
    """(kind, file) of a tokenizer dir or file: tokenizer.model first (Llama 2 dirs ship both), else tokenizer.json."""
    path = Path(path)
    if path.is_file():
        return ("bpe" if path.suffix == ".json" else "sentencepiece"), path
    for name, kind in (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "bpe")):
        if (path / name).is_file():
            return kind, path / name
    raise HibariError(f"{where} {path}: no tokenizer.model or tokenizer.json found")


# -- SentencePiece -------------------------------------------------------------------------------------------------
def _spm_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as err:  # protobuf missing
        raise HibariError(f"reading SentencePiece models needs the protobuf package ({err})") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError
        raise HibariError(f"{path}: not a SentencePiece model ({err})") from None
    if not proto.pieces:
        raise HibariError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _spm_sources(base_file: Path, new_file: Path) -> tuple[int, int, dict[int, list[int]]]:
    import sentencepiece as spm

    old_proto, new_proto = _spm_proto(base_file), _spm_proto(new_file)
    base_size, new_size = len(old_proto.pieces), len(new_proto.pieces)
    if new_size < base_size:
        raise HibariError(f"tokenizer {new_file} ({new_size} pieces) is smaller than the base tokenizer "
                          f"{base_file} ({base_size} pieces)")
    for i, (a, b) in enumerate(zip(old_proto.pieces, new_proto.pieces)):
        if a.piece != b.piece:
            raise HibariError(f"tokenizer {new_file} is not an expansion of {base_file}: id {i} is {b.piece!r}, "
                              f"base has {a.piece!r} (original ids must be unchanged)")
    unk = old_proto.trainer_spec.unk_id
    old_proto.normalizer_spec.add_dummy_prefix = False  # split a piece's text as it stands
    old_sp = spm.SentencePieceProcessor(model_proto=old_proto.SerializeToString())
    sources = {}
    for i in range(base_size, new_size):
        ids = old_sp.encode(new_proto.pieces[i].piece.replace("\u2581", " "))
        sources[i] = [int(x) for x in ids] if ids else [unk]
    return base_size, new_size, sources


# -- byte-level BPE ------------------------------------------------------------------------------------------------
def _load_tokenizer_json(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust loader raises plain Exception
        raise HibariError(f"{path}: not a loadable tokenizer.json ({str(err).splitlines()[0]})") from None


def _bpe_sources(base_file: Path, new_file: Path) -> tuple[int, int, dict[int, list[int]]]:
    base, new = _load_tokenizer_json(base_file), _load_tokenizer_json(new_file)
    if type(base.model).__name__ != "BPE" or type(new.model).__name__ != "BPE":
        raise HibariError(f"{new_file} / {base_file}: expected byte-level BPE tokenizers (model type BPE)")
    base_vocab = base.get_vocab(with_added_tokens=True)
    new_vocab = new.get_vocab(with_added_tokens=True)
    for token, i in sorted(base_vocab.items(), key=lambda kv: kv[1]):
        if new_vocab.get(token) != i:
            raise HibariError(f"tokenizer {new_file} is not an expansion of {base_file}: base token {token!r} has id "
                              f"{i} but {new_vocab.get(token)} there (original ids must be unchanged)")
    base_size = max(base_vocab.values()) + 1
    new_size = max(new_vocab.values()) + 1
    base_ids = set(base_vocab.values())
    sources = {}
    for token, i in new_vocab.items():
        if i in base_ids:
            continue
        ids = [t.id for t in base.model.tokenize(token)]  # the base tokens this token's bytes decode to
        if not ids:
            raise HibariError(f"{new_file}: new token {token!r} (id {i}) cannot be split by the base BPE model")
        sources[i] = ids
    return base_size, new_size, dict(sorted(sources.items()))


# -- resolution ----------------------------------------------------------------------------------------------------
def resolve_expansion(tokenizer_dir: str | Path, base_tokenizer: str | Path | None,
                      model_dir: Path | None) -> VocabExpansion:
    """The expanded tokenizer, its base (--base-tokenizer, else the model dir's own tokenizer, else the base recorded
    by `hibari tokenizer expand`) and the source ids of every new token."""
    tokenizer_dir = Path(tokenizer_dir)
    kind, new_file = tokenizer_file(tokenizer_dir, "--tokenizer")
    meta = {}
    if tokenizer_dir.is_dir() and (tokenizer_dir / META_FILE).is_file():
        meta = json.loads((tokenizer_dir / META_FILE).read_text(encoding="utf-8"))
    candidates = []
    if base_tokenizer is not None:
        candidates.append(("--base-tokenizer", Path(base_tokenizer)))
    else:
        if model_dir is not None:
            candidates.append(("model dir", model_dir))
        if meta.get("base"):
            candidates.append((f"{META_FILE} base", Path(meta["base"])))
    base_file = None
    for where, path in candidates:
        try:
            base_kind, base_file = tokenizer_file(path, where)
        except HibariError:
            if where == "--base-tokenizer":
                raise
            continue
        if base_kind == kind:
            break
        if where == "--base-tokenizer":
            raise HibariError(f"--base-tokenizer {path} is a {base_kind} tokenizer but --tokenizer {tokenizer_dir} "
                              f"is a {kind} one")
        base_file = None
    if base_file is None:
        raise HibariError(f"base tokenizer unknown: pass --base-tokenizer (the model dir has no tokenizer and "
                          f"{tokenizer_dir / META_FILE} names none that exists)")
    if kind == "sentencepiece":
        base_size, new_size, sources = _spm_sources(base_file, new_file)
    else:
        base_size, new_size, sources = _bpe_sources(base_file, new_file)
    if not sources:
        raise HibariError(f"tokenizer {new_file} adds no tokens to the base tokenizer {base_file}: nothing to expand "
                          f"(is the model dir's tokenizer already the expanded one? pass --base-tokenizer)")
    return VocabExpansion(kind, base_file, new_file, base_size, new_size, sources, meta)
