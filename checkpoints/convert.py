"""HF <-> hibari checkpoint conversion, streamed tensor by tensor.

`hf_to_hibari` never copies a tensor into anonymous memory before DCP writes it (tensors are views of a memory
map), and `hibari_to_hf` loads one tensor at a time and buffers at most one safetensors shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoints.hf_mapping import (expected_shapes, hf_config_from_model_args, hf_to_hibari_name, hibari_to_hf_name,
                                    model_args_from_hf_config)
from checkpoints.hibari_ckpt import (iter_model_tensors, prepare_output_dir, read_model_json,
                                     save_model_state_streaming, tensor_metadata, write_model_json)
from checkpoints.safetensors_io import open_hf_weights, parse_size, save_sharded
from hibari.errors import HibariError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HibariError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    if not path.is_file():
        raise HibariError(f"{path}: not found (expected a Hugging Face model directory with config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HibariError(f"{path}: invalid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(cfg, dict):
        raise HibariError(f"{path}: expected a JSON object")
    return cfg


def hf_to_hibari(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Convert an HF Llama/Mistral directory into a hibari checkpoint. Returns a summary dict."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    args = model_args_from_hf_config(cfg, source=str(hf_dir / "config.json"))
    files = open_hf_weights(hf_dir)
    expected = expected_shapes(args)
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    sources: dict[str, tuple[str, object]] = {}
    for hf_name, f in files.items():
        name = hf_to_hibari_name(hf_name)
        if name is None:
            continue
        if name == "output.weight" and args.tie_embeddings:
            continue  # some tied checkpoints store the head anyway; it is the embedding
        if name not in expected:
            raise HibariError(f"{f.path}: tensor {hf_name!r} does not belong to a {args.n_layers}-layer model")
        shape = f.shape(hf_name)
        if tuple(shape) != expected[name]:
            raise HibariError(f"{f.path}: tensor {hf_name!r} has shape {list(shape)}, expected "
                              f"{list(expected[name])} from config.json")
        specs[name] = (tuple(shape), f.dtype(hf_name))
        sources[name] = (hf_name, f)
    missing = [n for n in expected if n not in specs]
    if missing:
        raise HibariError(f"{hf_dir}: checkpoint is missing {len(missing)} tensor(s), e.g. "
                          f"{hibari_to_hf_name(missing[0])!r}")
    out = prepare_output_dir(out_dir, overwrite)

    def load(name: str) -> torch.Tensor:
        hf_name, f = sources[name]
        return f.get(hf_name)

    save_model_state_streaming(specs, load, out)
    # written last: a directory without it is recognisably incomplete
    write_model_json(out, args, hf_config=cfg, source=str(hf_dir))
    numels = {n: torch.Size(shape).numel() for n, (shape, _) in specs.items()}
    nbytes = sum(numels[n] * torch.empty((), dtype=dt).element_size() for n, (_, dt) in specs.items())
    return {"tensors": len(specs), "bytes": nbytes, "params": sum(numels.values())}


def _hf_order(names: list[str]) -> list[str]:
    """Embedding, blocks in order, norm, head: the order transformers writes (nicer shards)."""
    def key(n):
        if n == "tok_embeddings.weight":
            return (0, 0, n)
        if n.startswith("layers."):
            return (1, int(n.split(".")[1]), n)
        return (2, 0, n)
    return sorted(names, key=key)


def hibari_to_hf(ckpt_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                 dtype: str | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict:
    """Export a hibari checkpoint (converted or trained) as an HF model directory loadable by transformers."""
    args, meta = read_model_json(ckpt_dir)
    if dtype is not None and dtype not in DTYPES:
        raise HibariError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tmeta = tensor_metadata(ckpt_dir)
    expected = expected_shapes(args)
    names = [n for n in _hf_order(list(tmeta)) if n in expected and not (args.tie_embeddings and n == "output.weight")]
    missing = [n for n in expected if n not in tmeta]
    if missing:
        raise HibariError(f"{ckpt_dir}: checkpoint is missing tensor {missing[0]!r}")
    for n in names:
        if tuple(tmeta[n].size) != expected[n]:
            raise HibariError(f"{ckpt_dir}: tensor {n!r} has shape {list(tmeta[n].size)}, expected "
                              f"{list(expected[n])} from {ckpt_dir}/hibari_model.json")
    target = DTYPES[dtype] if dtype else None
    stored = {tmeta[n].properties.dtype for n in names}
    out_dtype = target or (stored.pop() if len(stored) == 1 else torch.float32)  # for config.json
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise HibariError(f"--tokenizer {tokenizer}: not a directory")
    out = prepare_output_dir(out_dir, overwrite)

    def tensors():
        for name, t in iter_model_tensors(ckpt_dir, names):
            yield hibari_to_hf_name(name), (t.to(target) if target is not None else t)

    specs = [(hibari_to_hf_name(n), tuple(tmeta[n].size), target or tmeta[n].properties.dtype) for n in names]
    total = sum(torch.Size(sh).numel() * torch.empty((), dtype=dt).element_size() for _, sh, dt in specs)
    files = save_sharded(specs, tensors(), out, max_shard_bytes=parse_size(max_shard_size))
    dtype_name = str(out_dtype).replace("torch.", "")
    cfg = hf_config_from_model_args(args, base=meta.get("hf_config"), dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": cfg.get("eos_token_id", 2),
           "do_sample": False}
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    copied = []
    if tokenizer is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer) / fname
            if src.is_file():
                shutil.copy2(src, out / fname)
                copied.append(fname)
        if not copied:
            raise HibariError(f"--tokenizer {tokenizer}: no tokenizer files found "
                              f"(expected one of {', '.join(TOKENIZER_FILES[:3])})")
    return {"tensors": len(names), "bytes": total, "files": [f.name for f in files], "tokenizer_files": copied}
