"""`hibari data tokenize`: corpus shards (JSONL[.zst]) -> one Megatron `PREFIX.bin`/`PREFIX.idx`.

Each shard is tokenized by a worker into its own part dataset under `PREFIX.parts/` with a completion marker
(resumable: a rerun tokenizes only missing shards); the parts are then merged in input order, so the output is
byte-identical whatever the worker count. Documents whose text is missing, empty or not encodable (e.g. lone
surrogates) are counted skips, never silent drops. Like Megatron's Llama tokenizers, each document gets BOS in front
(unless `add_bos=False`) and EOS appended with `append_eod`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from data_pipeline.executor import Task, marker_path, run_local
from data_pipeline.executor.provenance import describe_changes, files_digest, refuse_changed, source_identity
from data_pipeline.executor.tasks import read_marker
from data_pipeline.readers import as_source, resolve_inputs
from hibari.io import write_json
from data_pipeline.indexed.encode_batches import encode_into
from data_pipeline.indexed.writer import IndexedDatasetBuilder, merge_datasets
from data_pipeline.tokenizer.encoder import load_encoder
from hibari.errors import HibariError
from megatron_ext.data.indexed_dataset import dataset_exists, token_dtype_for_vocab

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenize_shard(shard, part_prefix: str, tokenizer_dir: str, text_key: str = "text",
                   append_eod: bool = False, add_bos: bool = True) -> dict:
    """Tokenize one shard (a `DocumentSource` or file path) into `part_prefix.{bin,idx}`. Returns counters (the
    task's completion stats)."""
    from data_pipeline.readers import iter_texts

    enc = load_encoder(tokenizer_dir)
    dtype = token_dtype_for_vocab(enc.vocab_size)
    prefix_ids = [enc.bos_id] if add_bos and enc.bos_id is not None else []
    suffix_ids = [enc.eos_id] if append_eod and enc.eos_id is not None else []
    stats = {"shard": as_source(shard).label, "documents": 0, "tokens": 0, "characters": 0, "skipped_missing_text": 0,
             "skipped_empty": 0, "skipped_undecodable": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    with IndexedDatasetBuilder(part_prefix, dtype) as builder:
        # batched encode + block writes; every id < vocab_size fits the dtype chosen from it
        encode_into(builder, iter_texts(shard, text_key), enc, prefix_ids, suffix_ids, stats)
        stats["tokens"] = builder.num_tokens
    stats["seconds"] = time.perf_counter() - t0
    return stats


def tokenizer_identity(tokenizer_dir: str | Path) -> dict:
    """Absolute path and a digest of the tokenizer's files: another tokenizer in the same place is a change."""
    path = Path(tokenizer_dir).resolve()
    files = [path / n for n in _TOKENIZER_FILES if (path / n).is_file()]
    return {"path": str(path), "sha256": files_digest(files)}


def _remove_dataset(prefix: str, parts_dir: Path) -> None:
    for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{prefix}.json")):
        p.unlink(missing_ok=True)
    shutil.rmtree(parts_dir, ignore_errors=True)


def tokenize_corpus(inputs: str | list[str], tokenizer_dir: str, output_prefix: str, workers: int = 1,
                    text_key: str = "text", append_eod: bool = False, add_bos: bool = True,
                    keep_parts: bool = False, show_progress: bool = True, split: str | None = None,
                    text_format: str = "line", runner=None, overwrite: bool = False) -> dict:
    """Tokenize all shards and write `output_prefix.{bin,idx}` plus `output_prefix.json` (stats and provenance).

    One executor task per shard (`runner`: default `run_local`; `data_pipeline.executor.make_runner(args)` for
    --executor slurm). An existing output made from other inputs, tokenizer or options is refused naming what
    changed, unless `overwrite`; the same command again returns the recorded summary."""
    files = resolve_inputs(inputs, split=split, text_format=text_format)
    enc = load_encoder(tokenizer_dir)  # fail on a bad tokenizer before any work starts
    out = Path(output_prefix)
    if out.name == "" or out.is_dir():
        raise HibariError(f"--output {output_prefix}: expected a file prefix such as data/ja_cc (got a directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    output_prefix = str(out.resolve())
    stats_path = Path(f"{output_prefix}.json")
    parts_dir = Path(f"{output_prefix}.parts")
    options = {"text_key": text_key, "append_eod": append_eod, "add_bos": add_bos, "text_format": text_format}
    settings = {"tokenizer": tokenizer_identity(tokenizer_dir), "options": options,
                "inputs": [f.label for f in files]}
    provenance = {**settings, "inputs": [source_identity(f) for f in files]}
    if stats_path.exists() or dataset_exists(output_prefix):
        summary = read_marker(stats_path) or {}
        old = summary.get("provenance")
        changes = describe_changes(old, provenance) if isinstance(old, dict) else \
            ["no record of its inputs and tokenizer"]
        if not changes and dataset_exists(output_prefix):
            summary["already_done"] = True
            return summary
        if not overwrite:
            raise refuse_changed(f"--output {output_prefix}", changes)
        _remove_dataset(output_prefix, parts_dir)
    settings_path = parts_dir / "settings.json"
    if settings_path.exists():
        old = read_marker(settings_path)
        changes = describe_changes(old, settings) if old is not None else ["unreadable settings.json"]
        if changes:
            if not overwrite:
                raise refuse_changed(f"{parts_dir} (an unfinished run)", changes)
            shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, settings, indent=1)

    tasks = []
    for i, f in enumerate(files):
        task_id = f"shard-{i:06d}"
        part = parts_dir / task_id
        if not dataset_exists(part):  # a marker without its part files is not done
            marker_path(parts_dir, task_id).unlink(missing_ok=True)
        tasks.append(Task(task_id, tokenize_shard, label=f.label, fingerprint=source_identity(f),
                          kwargs=dict(shard=f.to_dict(), part_prefix=str(part), tokenizer_dir=str(tokenizer_dir),
                                      text_key=text_key, append_eod=append_eod, add_bos=add_bos),
                          outputs=(f"{part}.bin", f"{part}.idx")))
    t0 = time.perf_counter()
    results = (runner or run_local)(tasks, parts_dir, workers=workers, desc="tokenize", show_progress=show_progress)
    elapsed = time.perf_counter() - t0
    ordered = [results[t.task_id] for t in tasks]
    n_seq, n_tok = merge_datasets([t.kwargs["part_prefix"] for t in tasks], output_prefix, move=not keep_parts)
    new_tokens = sum(s["tokens"] for s in ordered)
    summary = {"output": output_prefix, "tokenizer": enc.name, "vocab_size": enc.vocab_size,
               "dtype": np.dtype(token_dtype_for_vocab(enc.vocab_size)).name, "shards": len(tasks),
               "documents": n_seq, "tokens": n_tok,
               "characters": sum(s["characters"] for s in ordered),
               "skipped_missing_text": sum(s["skipped_missing_text"] for s in ordered),
               "skipped_empty": sum(s["skipped_empty"] for s in ordered),
               "skipped_undecodable": sum(s["skipped_undecodable"] for s in ordered),
               "append_eod": append_eod, "add_bos": add_bos, "seconds_this_run": round(elapsed, 3),
               "tokens_per_second_this_run": round(new_tokens / elapsed, 1) if elapsed > 0 else None,
               "provenance": provenance}
    write_json(stats_path, summary, indent=1)
    if not keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return summary
