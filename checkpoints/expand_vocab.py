"""`hibari convert expand-vocab`: grow a model's embeddings and output head to an expanded tokenizer (Swallow).

Each new row is the mean of the ORIGINAL rows of the pieces that the ORIGINAL tokenizer splits the new piece's text
into (input embeddings, and the output head likewise when it is not tied). Rows past the tokenizer size up to the
padded size are set to the mean of all original rows. Original rows are copied bit for bit, so the logits of
original tokens for text made only of original tokens are unchanged.

Works on Hugging Face directories (config.json + safetensors, streamed tensor by tensor) and on hibari
checkpoints (`--ckpt`, via checkpoints.hibari_ckpt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hibari.errors import HibariError

HF_EMBED = "model.embed_tokens.weight"
HF_HEAD = "lm_head.weight"
HIBARI_EMBED = "tok_embeddings.weight"
HIBARI_HEAD = "output.weight"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "hibari_tokenizer.json")


def _processor_without_dummy_prefix(model_file: Path):
    """The old tokenizer, but without the dummy-prefix space, so a piece's text is split as it stands."""
    import sentencepiece as spm

    from data_pipeline.tokenizer.spm import load_model_proto

    proto = load_model_proto(model_file)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), proto


def new_piece_sources(base_model: Path, new_model: Path) -> tuple[int, int, list[list[int]]]:
    """(base size, new size, for each new id the list of old ids its text splits into)."""
    from data_pipeline.tokenizer.spm import load_model_proto

    old_sp, old_proto = _processor_without_dummy_prefix(base_model)
    new_proto = load_model_proto(new_model)
    base_size, new_size = len(old_proto.pieces), len(new_proto.pieces)
    if new_size < base_size:
        raise HibariError(f"tokenizer {new_model} ({new_size} pieces) is smaller than the base tokenizer "
                          f"{base_model} ({base_size} pieces)")
    for i, (a, b) in enumerate(zip(old_proto.pieces, new_proto.pieces)):
        if a.piece != b.piece:
            raise HibariError(f"tokenizer {new_model} is not an expansion of {base_model}: id {i} is {b.piece!r}, "
                              f"base has {a.piece!r} (original ids must be unchanged)")
    sources = []
    for i in range(base_size, new_size):
        text = new_proto.pieces[i].piece.replace("\u2581", " ")
        ids = old_sp.encode(text)
        sources.append([int(x) for x in ids] if ids else [old_proto.trainer_spec.unk_id])
    return base_size, new_size, sources


def expand_matrix(weight, base_size: int, padded_size: int, sources: list[list[int]]):
    """[old_rows, dim] -> [padded_size, dim]: rows < base_size copied, new rows = means, pad rows = mean of old."""
    import torch

    old = weight[:base_size].to(torch.float32)
    out = torch.empty((padded_size, weight.shape[1]), dtype=weight.dtype)
    out[:base_size] = weight[:base_size]
    for k, ids in enumerate(sources):
        out[base_size + k] = old[torch.as_tensor(ids)].mean(dim=0).to(weight.dtype)
    start = base_size + len(sources)
    if start < padded_size:
        out[start:] = old.mean(dim=0).to(weight.dtype)
    return out


def _resolve_tokenizers(new_dir: str | Path, base_tokenizer: str | Path | None, model_dir: Path | None):
    from data_pipeline.tokenizer.spm import META_FILE, resolve_model_file

    new_dir = Path(new_dir)
    new_model = resolve_model_file(new_dir)
    meta = {}
    if (new_dir / META_FILE).is_file():
        meta = json.loads((new_dir / META_FILE).read_text(encoding="utf-8"))
    if base_tokenizer is not None:
        base_model = resolve_model_file(base_tokenizer)
    elif model_dir is not None and (model_dir / "tokenizer.model").is_file():
        base_model = model_dir / "tokenizer.model"
    elif meta.get("base") and Path(meta["base"]).is_file():
        base_model = Path(meta["base"])
    else:
        raise HibariError(f"base tokenizer unknown: pass --base-tokenizer (the model dir has no tokenizer.model and "
                          f"{new_dir / META_FILE} names none that exists)")
    return new_model, base_model, meta


def _padded(new_size: int, meta: dict, pad_to_multiple: int | None) -> int:
    multiple = pad_to_multiple or int(meta.get("pad_to_multiple", 1))
    if multiple < 1:
        raise HibariError(f"--pad-to-multiple {multiple}: expected a positive integer")
    return -(-new_size // multiple) * multiple


def _check_rows(rows: int, base_size: int, where: str, base_model: Path) -> None:
    if rows < base_size:
        raise HibariError(f"{where}: embeddings have {rows} rows but the base tokenizer {base_model} has "
                          f"{base_size} pieces (is it the model's own tokenizer?)")


def expand_hf(hf_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
              base_tokenizer: str | Path | None = None, pad_to_multiple: int | None = None,
              overwrite: bool = False, max_shard_size: str = "5GB") -> dict:
    from checkpoints.convert import read_hf_config
    from checkpoints.hibari_ckpt import prepare_output_dir
    from checkpoints.safetensors_io import open_hf_weights, parse_size, save_sharded

    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    new_model, base_model, meta = _resolve_tokenizers(tokenizer_dir, base_tokenizer, hf_dir)
    base_size, new_size, sources = new_piece_sources(base_model, new_model)
    padded = _padded(new_size, meta, pad_to_multiple)
    weights = open_hf_weights(hf_dir)
    if HF_EMBED not in weights:
        raise HibariError(f"{hf_dir}: tensor {HF_EMBED} not found (expected a Llama/Mistral checkpoint)")
    rows = weights[HF_EMBED].shape(HF_EMBED)[0]
    _check_rows(rows, base_size, str(hf_dir), base_model)
    if padded < rows:
        raise HibariError(f"{hf_dir}: model already has {rows} embedding rows, more than the expanded tokenizer "
                          f"needs ({padded}); nothing to expand")
    out = prepare_output_dir(out_dir, overwrite)
    tied = HF_HEAD not in weights
    names = list(weights)
    specs = []
    for n in names:
        shape = tuple(weights[n].shape(n))
        if n in (HF_EMBED, HF_HEAD):
            shape = (padded,) + shape[1:]
        specs.append((n, shape, weights[n].dtype(n)))

    def tensors():
        for n in names:
            t = weights[n].get(n)
            if n in (HF_EMBED, HF_HEAD):
                t = expand_matrix(t, base_size, padded, sources)
            yield n, t

    save_sharded(specs, tensors(), out, max_shard_bytes=parse_size(max_shard_size))
    cfg["vocab_size"] = padded
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    if (hf_dir / "generation_config.json").is_file():
        shutil.copyfile(hf_dir / "generation_config.json", out / "generation_config.json")
    copied = _copy_tokenizer(Path(tokenizer_dir), out)
    return {"base_vocab_size": base_size, "tokenizer_vocab_size": new_size, "padded_vocab_size": padded,
            "old_rows": rows, "new_rows": len(sources), "tied": tied, "tokenizer_files": copied}


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
            copied.append(name)
    return copied


def expand_hibari(ckpt_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                  base_tokenizer: str | Path | None = None, pad_to_multiple: int | None = None,
                  overwrite: bool = False) -> dict:
    from checkpoints.hibari_ckpt import load_hibari_state, save_hibari

    ckpt_dir = Path(ckpt_dir)
    state, model_json = load_hibari_state(ckpt_dir)
    new_model, base_model, meta = _resolve_tokenizers(tokenizer_dir, base_tokenizer, None)
    base_size, new_size, sources = new_piece_sources(base_model, new_model)
    padded = _padded(new_size, meta, pad_to_multiple)
    if HIBARI_EMBED not in state:
        raise HibariError(f"{ckpt_dir}: tensor {HIBARI_EMBED} not found in the checkpoint")
    rows = state[HIBARI_EMBED].shape[0]
    _check_rows(rows, base_size, str(ckpt_dir), base_model)
    if padded < rows:
        raise HibariError(f"{ckpt_dir}: model already has {rows} embedding rows, more than the expanded tokenizer "
                          f"needs ({padded}); nothing to expand")
    for n in (HIBARI_EMBED, HIBARI_HEAD):
        if n in state:
            state[n] = expand_matrix(state[n], base_size, padded, sources)
    model_json = json.loads(json.dumps(model_json))
    model_json["model"]["vocab_size"] = padded
    if model_json.get("hf_config"):
        model_json["hf_config"]["vocab_size"] = padded
    out = save_hibari(state, model_json, out_dir, overwrite=overwrite)
    copied = _copy_tokenizer(Path(tokenizer_dir), out)
    return {"base_vocab_size": base_size, "tokenizer_vocab_size": new_size, "padded_vocab_size": padded,
            "old_rows": rows, "new_rows": len(sources), "tied": HIBARI_HEAD not in state, "tokenizer_files": copied}


def _handler(args) -> int:
    if bool(args.hf) == bool(args.ckpt):
        raise HibariError("expand-vocab: give exactly one of --hf DIR or --ckpt DIR")
    if args.hf:
        s = expand_hf(args.hf, args.tokenizer, args.out, base_tokenizer=args.base_tokenizer,
                      pad_to_multiple=args.pad_to_multiple, overwrite=args.overwrite)
    else:
        s = expand_hibari(args.ckpt, args.tokenizer, args.out, base_tokenizer=args.base_tokenizer,
                          pad_to_multiple=args.pad_to_multiple, overwrite=args.overwrite)
    print(f"expanded {args.hf or args.ckpt} -> {args.out}: {s['old_rows']:,} -> {s['padded_vocab_size']:,} rows "
          f"({s['new_rows']:,} new pieces initialised as means of their original pieces, "
          f"{s['padded_vocab_size'] - s['tokenizer_vocab_size']} padding rows); "
          f"output head {'tied' if s['tied'] else 'expanded likewise'}")
    return 0


def register_expand_vocab(convert_subparsers) -> None:
    p = convert_subparsers.add_parser(
        "expand-vocab", help="grow embeddings/output head to an expanded tokenizer (Swallow mean init)",
        description="Grow the input embeddings and output head to the expanded tokenizer's size (padded to a "
                    "multiple). Each new row = mean of the original rows of the pieces the original tokenizer "
                    "splits the new piece into; original rows unchanged.")
    p.add_argument("--hf", help="HF model directory (config.json + safetensors)")
    p.add_argument("--ckpt", help="hibari checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="expanded tokenizer dir (hibari tokenizer expand --out)")
    p.add_argument("--base-tokenizer", help="original tokenizer dir/.model (default: the HF dir's tokenizer.model, "
                                            "else the base recorded by `hibari tokenizer expand`)")
    p.add_argument("--out", required=True, help="output directory (same format as the input)")
    p.add_argument("--pad-to-multiple", type=int, help="default: the value recorded by `hibari tokenizer expand`")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_handler)
