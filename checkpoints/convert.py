"""HF <-> hibari checkpoint conversion, streamed tensor by tensor.

`hf_to_hibari` never copies a tensor into anonymous memory before DCP writes it (tensors are views of a memory
map), and `hibari_to_hf` loads one tensor at a time and buffers at most one safetensors shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoints.hf_mapping import (expected_shapes, hf_config_from_model_args, hf_to_hibari_slot, hibari_to_hf_names,
                                    model_args_from_hf_config)
from checkpoints.hibari_ckpt import save_model_state_streaming, staged_output_dir
from megatron_ext.checkpoint import MODEL_JSON, iter_model_tensors, read_model_json, tensor_metadata, write_model_json
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
    """Convert an HF Llama/Mistral/Mixtral directory into a hibari checkpoint. Returns a summary dict."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    args = model_args_from_hf_config(cfg, source=str(hf_dir / "config.json"))
    files = open_hf_weights(hf_dir)
    expected = expected_shapes(args)
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    sources: dict[str, tuple[str, object]] = {}
    experts: dict[str, dict[int, tuple[str, object]]] = {}  # stacked Mixtral experts: one HF tensor per expert
    for hf_name, f in files.items():
        slot = hf_to_hibari_slot(hf_name)
        if slot is None:
            continue
        name, expert = slot
        if expert is not None:
            if name not in expected or expert >= expected[name][0]:
                raise HibariError(f"{f.path}: tensor {hf_name!r} does not belong to a {args.n_layers}-layer model "
                                  f"with {args.n_experts} experts")
            if tuple(f.shape(hf_name)) != expected[name][1:]:
                raise HibariError(f"{f.path}: tensor {hf_name!r} has shape {list(f.shape(hf_name))}, expected "
                                  f"{list(expected[name][1:])} from config.json")
            experts.setdefault(name, {})[expert] = (hf_name, f)
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
    for name, parts in experts.items():
        absent = [i for i in range(expected[name][0]) if i not in parts]
        if absent:
            raise HibariError(f"{hf_dir}: checkpoint is missing tensor "
                              f"{hibari_to_hf_names(name, args.n_experts)[absent[0]]!r}")
        dtypes = {f.dtype(hf_name) for hf_name, f in parts.values()}
        if len(dtypes) > 1:
            raise HibariError(f"{hf_dir}: the experts of {name!r} have different dtypes {sorted(map(str, dtypes))}")
        specs[name] = (expected[name], dtypes.pop())
        sources[name] = [parts[i] for i in range(expected[name][0])]
    missing = [n for n in expected if n not in specs]
    if missing:
        raise HibariError(f"{hf_dir}: checkpoint is missing {len(missing)} tensor(s), e.g. "
                          f"{hibari_to_hf_names(missing[0], args.n_experts)[0]!r}")

    def load(name: str) -> torch.Tensor:
        if isinstance(sources[name], list):  # one stacked copy of the experts' tensors
            return torch.stack([f.get(hf_name) for hf_name, f in sources[name]])
        hf_name, f = sources[name]
        return f.get(hf_name)

    with staged_output_dir(out_dir, overwrite) as stage:
        save_model_state_streaming(specs, load, stage)
        write_model_json(stage, args, hf_config=cfg, source=str(hf_dir))
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
                              f"{list(expected[n])} from {ckpt_dir}/{MODEL_JSON}")
    target = DTYPES[dtype] if dtype else None
    stored = {tmeta[n].properties.dtype for n in names}
    out_dtype = target or (stored.pop() if len(stored) == 1 else torch.float32)  # for config.json
    tokenizer_files = []
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise HibariError(f"--tokenizer {tokenizer}: not a directory")
        tokenizer_files = [f for f in TOKENIZER_FILES if (Path(tokenizer) / f).is_file()]
        if not tokenizer_files:
            raise HibariError(f"--tokenizer {tokenizer}: no tokenizer files found "
                              f"(expected one of {', '.join(TOKENIZER_FILES[:3])})")
    specs = [(hf_name, tuple(tmeta[n].size)[1:] if len(hf_names) > 1 else tuple(tmeta[n].size),
              target or tmeta[n].properties.dtype)
             for n in names for hf_names in [hibari_to_hf_names(n, args.n_experts)] for hf_name in hf_names]
    total = sum(torch.Size(sh).numel() * torch.empty((), dtype=dt).element_size() for _, sh, dt in specs)
    dtype_name = str(out_dtype).replace("torch.", "")
    cfg = hf_config_from_model_args(args, base=meta.get("hf_config"), dtype=dtype_name)
    gen = {"bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": cfg.get("eos_token_id", 2),
           "do_sample": False}
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    with staged_output_dir(out_dir, overwrite) as out:
        def tensors():
            for name, t in iter_model_tensors(ckpt_dir, names):
                t = t.to(target) if target is not None else t
                hf_names = hibari_to_hf_names(name, args.n_experts)
                if len(hf_names) == 1:
                    yield hf_names[0], t
                else:  # stacked experts -> one tensor per expert
                    yield from ((hf_name, t[i]) for i, hf_name in enumerate(hf_names))

        files = save_sharded(specs, tensors(), out, max_shard_bytes=parse_size(max_shard_size))
        (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        for fname in tokenizer_files:
            shutil.copy2(Path(tokenizer) / fname, out / fname)
    return {"tensors": len(names), "bytes": total, "files": [f.name for f in files], "tokenizer_files": tokenizer_files}
