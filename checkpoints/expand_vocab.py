"""`hibari convert expand-vocab`: grow a model's embeddings and output head to an expanded tokenizer (Swallow).

Each new row is the mean of the ORIGINAL rows of the tokens that the ORIGINAL tokenizer splits the new token into
(checkpoints.vocab_sources: SentencePiece pieces by their text, byte-level BPE tokens by their bytes), for the input
embeddings and the output head likewise when it is not tied. Rows past the tokenizer size up to the padded size are
set to the mean of all original rows. Original rows are copied bit for bit, so the logits of original tokens for text
made only of original tokens are unchanged. A model with spare rows past its tokenizer (Qwen) keeps its row count
when the new tokens fit: they take the unused rows.

Works on Hugging Face directories (config.json + safetensors, streamed tensor by tensor) and on hibari
checkpoints (`--ckpt`, via checkpoints.hibari_ckpt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from checkpoints.vocab_sources import VocabExpansion, resolve_expansion
from hibari.errors import HibariError

HF_EMBED = "model.embed_tokens.weight"
HF_HEAD = "lm_head.weight"
HIBARI_EMBED = "tok_embeddings.weight"
HIBARI_HEAD = "output.weight"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "hibari_tokenizer.json")


def expand_matrix(weight, base_size: int, out_rows: int, sources: dict[int, list[int]]):
    """[old_rows, dim] -> [out_rows, dim]: old rows copied, each new id's row = mean of the original rows of its
    source ids, rows past the old ones that no token uses = mean of the original rows."""
    import torch

    old_rows = weight.shape[0]
    original = weight[:base_size].to(torch.float32)
    out = torch.empty((out_rows, weight.shape[1]), dtype=weight.dtype)
    keep = min(old_rows, out_rows)
    out[:keep] = weight[:keep]
    if out_rows > old_rows:
        out[old_rows:] = original.mean(dim=0).to(weight.dtype)
    for i, ids in sources.items():
        out[i] = original[torch.as_tensor(ids)].mean(dim=0).to(weight.dtype)
    return out


def _out_rows(exp: VocabExpansion, rows: int, pad_to_multiple: int | None, where: str) -> int:
    """Rows after expansion: the tokenizer size padded to the multiple, never fewer than the model has (Qwen-style
    models ship spare rows past their tokenizer; new tokens then take those unused rows)."""
    multiple = pad_to_multiple or int(exp.meta.get("pad_to_multiple", 1))
    if multiple < 1:
        raise HibariError(f"--pad-to-multiple {multiple}: expected a positive integer")
    if rows < exp.base_size:
        raise HibariError(f"{where}: embeddings have {rows} rows but the base tokenizer {exp.base_file} has "
                          f"{exp.base_size} tokens (is it the model's own tokenizer?)")
    return max(rows, -(-exp.new_size // multiple) * multiple)


def _summary(exp: VocabExpansion, rows: int, out_rows: int, tied: bool, copied: list[str]) -> dict:
    return {"kind": exp.kind, "base_vocab_size": exp.base_size, "tokenizer_vocab_size": exp.new_size,
            "padded_vocab_size": out_rows, "old_rows": rows, "new_rows": len(exp.sources),
            "reused_rows": sum(i < rows for i in exp.sources), "tied": tied, "tokenizer_files": copied}


def expand_hf(hf_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
              base_tokenizer: str | Path | None = None, pad_to_multiple: int | None = None,
              overwrite: bool = False, max_shard_size: str = "5GB") -> dict:
    from checkpoints.convert import read_hf_config
    from checkpoints.hibari_ckpt import prepare_output_dir
    from checkpoints.safetensors_io import open_hf_weights, parse_size, save_sharded

    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    exp = resolve_expansion(tokenizer_dir, base_tokenizer, hf_dir)
    weights = open_hf_weights(hf_dir)
    if HF_EMBED not in weights:
        raise HibariError(f"{hf_dir}: tensor {HF_EMBED} not found (expected a Llama/Mistral/Mixtral checkpoint)")
    rows = weights[HF_EMBED].shape(HF_EMBED)[0]
    padded = _out_rows(exp, rows, pad_to_multiple, str(hf_dir))
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
                t = expand_matrix(t, exp.base_size, padded, exp.sources)
            yield n, t

    save_sharded(specs, tensors(), out, max_shard_bytes=parse_size(max_shard_size))
    cfg["vocab_size"] = padded
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    if (hf_dir / "generation_config.json").is_file():
        shutil.copyfile(hf_dir / "generation_config.json", out / "generation_config.json")
    copied = _copy_tokenizer(Path(tokenizer_dir), out)
    return _summary(exp, rows, padded, tied, copied)


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
    from checkpoints.hibari_ckpt import save_hibari
    from megatron_ext.checkpoint import load_model_state

    ckpt_dir = Path(ckpt_dir)
    state, model_json = load_model_state(ckpt_dir)
    exp = resolve_expansion(tokenizer_dir, base_tokenizer, None)
    if HIBARI_EMBED not in state:
        raise HibariError(f"{ckpt_dir}: tensor {HIBARI_EMBED} not found in the checkpoint")
    rows = state[HIBARI_EMBED].shape[0]
    padded = _out_rows(exp, rows, pad_to_multiple, str(ckpt_dir))
    for n in (HIBARI_EMBED, HIBARI_HEAD):
        if n in state:
            state[n] = expand_matrix(state[n], exp.base_size, padded, exp.sources)
    model_json = json.loads(json.dumps(model_json))
    model_json["model"]["vocab_size"] = padded
    if model_json.get("hf_config"):
        model_json["hf_config"]["vocab_size"] = padded
    out = save_hibari(state, model_json, out_dir, overwrite=overwrite)
    copied = _copy_tokenizer(Path(tokenizer_dir), out)
    return _summary(exp, rows, padded, HIBARI_HEAD not in state, copied)


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
          f"({s['new_rows']:,} new tokens initialised as means of their original tokens"
          f"{', ' + format(s['reused_rows'], ',') + ' of them in unused rows' if s['reused_rows'] else ''}, "
          f"{s['padded_vocab_size'] - s['tokenizer_vocab_size']} padding rows); "
          f"output head {'tied' if s['tied'] else 'expanded likewise'}")
    return 0


def register_expand_vocab(convert_subparsers) -> None:
    p = convert_subparsers.add_parser(
        "expand-vocab", help="grow embeddings/output head to an expanded tokenizer (Swallow mean init)",
        description="Grow the input embeddings and output head to the expanded tokenizer's size (padded to a "
                    "multiple). Each new row = mean of the original rows of the tokens the original tokenizer "
                    "splits the new token into; original rows unchanged. SentencePiece (tokenizer.model) and "
                    "byte-level BPE (tokenizer.json: Llama 3, Qwen, Mistral-Nemo) tokenizers.")
    p.add_argument("--hf", help="HF model directory (config.json + safetensors)")
    p.add_argument("--ckpt", help="hibari checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="expanded tokenizer dir (hibari tokenizer expand --out)")
    p.add_argument("--base-tokenizer", help="original tokenizer dir, .model or tokenizer.json (default: the HF dir's "
                                            "tokenizer, else the base recorded by `hibari tokenizer expand`)")
    p.add_argument("--out", required=True, help="output directory (same format as the input)")
    p.add_argument("--pad-to-multiple", type=int, help="default: the value recorded by `hibari tokenizer expand`")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_handler)
