"""`hibari data tokenize`: corpus shards (JSONL[.zst]) -> one Megatron `PREFIX.bin`/`PREFIX.idx`.

Each shard is tokenized by a worker into its own part dataset under `PREFIX.parts/` with a completion marker
(resumable: a rerun tokenizes only missing shards); the parts are then merged in input order, so the output is
byte-identical whatever the worker count. Documents whose text is missing, empty or not encodable (e.g. lone
surrogates) are counted skips, never silent drops. Like Megatron's Llama tokenizers, each document gets BOS in front
(unless `add_bos=False`) and EOS appended with `append_eod`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from data_pipeline.executor import is_done, load_done, mark_done
from hibari.io import atomic_write, expand_inputs
from data_pipeline.indexed.writer import IndexedDatasetBuilder, merge_datasets
from data_pipeline.tokenizer.encoder import load_encoder
from hibari.errors import HibariError
from hibari.progress import progress_bar
from megatron_ext.data.indexed_dataset import dataset_exists, token_dtype_for_vocab


def tokenize_shard(shard: str, part_prefix: str, tokenizer_dir: str, text_key: str = "text",
                   append_eod: bool = False, add_bos: bool = True) -> dict:
    """Tokenize one shard into `part_prefix.{bin,idx}`. Returns counters (the task's completion stats)."""
    from hibari.io import read_jsonl

    enc = load_encoder(tokenizer_dir)
    dtype = token_dtype_for_vocab(enc.vocab_size)
    prefix_ids = [enc.bos_id] if add_bos and enc.bos_id is not None else []
    suffix_ids = [enc.eos_id] if append_eod and enc.eos_id is not None else []
    stats = {"shard": shard, "documents": 0, "tokens": 0, "characters": 0, "skipped_missing_text": 0,
             "skipped_empty": 0, "skipped_undecodable": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    with IndexedDatasetBuilder(part_prefix, dtype) as builder:
        for rec in read_jsonl(shard):
            text = rec.get(text_key)
            if not isinstance(text, str):
                stats["skipped_missing_text"] += 1
                continue
            if not text or text.isspace():
                stats["skipped_empty"] += 1
                continue
            try:
                ids = enc.encode(text)
            except (UnicodeError, RuntimeError, TypeError):
                stats["skipped_undecodable"] += 1  # e.g. lone surrogates from a bad \\ud800 escape
                continue
            if not ids:
                stats["skipped_empty"] += 1
                continue
            if prefix_ids or suffix_ids:
                ids = prefix_ids + ids + suffix_ids
            builder.add_document(ids, checked=True)  # every id < vocab_size fits the dtype chosen from it
            stats["documents"] += 1
            stats["characters"] += len(text)
        stats["tokens"] = builder.num_tokens
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _run_one(task_id: str, state_dir: str, kwargs: dict) -> dict:
    stats = tokenize_shard(**kwargs)
    mark_done(state_dir, task_id, stats)
    return stats


def tokenize_corpus(inputs: str | list[str], tokenizer_dir: str, output_prefix: str, workers: int = 1,
                    text_key: str = "text", append_eod: bool = False, add_bos: bool = True,
                    keep_parts: bool = False, show_progress: bool = True) -> dict:
    """Tokenize all shards and write `output_prefix.{bin,idx}` plus `output_prefix.json` (stats)."""
    files = expand_inputs(inputs)
    enc = load_encoder(tokenizer_dir)  # fail on a bad tokenizer before any work starts
    out = Path(output_prefix)
    if out.name == "" or out.is_dir():
        raise HibariError(f"--output {output_prefix}: expected a file prefix such as data/ja_cc (got a directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stats_path = Path(f"{output_prefix}.json")
    if dataset_exists(output_prefix) and stats_path.is_file():
        summary = json.loads(stats_path.read_text(encoding="utf-8"))
        summary["already_done"] = True
        return summary
    parts_dir = Path(f"{output_prefix}.parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    settings = {"tokenizer": str(Path(tokenizer_dir).resolve()), "text_key": text_key, "append_eod": append_eod,
                "add_bos": add_bos, "inputs": [str(f.resolve()) for f in files]}
    settings_path = parts_dir / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text(encoding="utf-8")) != settings:
        raise HibariError(f"{parts_dir}: left by a run with different inputs/settings; remove it or use another "
                          f"--output")
    with atomic_write(settings_path, "w") as f:
        json.dump(settings, f, indent=1)

    tasks = []
    for i, f in enumerate(files):
        task_id = f"shard-{i:06d}"
        kwargs = dict(shard=str(f), part_prefix=str(parts_dir / task_id), tokenizer_dir=str(tokenizer_dir),
                      text_key=text_key, append_eod=append_eod, add_bos=add_bos)
        tasks.append((task_id, kwargs, f.stat().st_size))
    state_dir = str(parts_dir)
    results: dict[str, dict] = {}
    pending = []
    for task_id, kwargs, size in tasks:
        if is_done(state_dir, task_id) and dataset_exists(kwargs["part_prefix"]):
            results[task_id] = load_done(state_dir, task_id)
        else:
            pending.append((task_id, kwargs, size))
    total_bytes = sum(s for _, _, s in tasks)
    failures: list[tuple[str, BaseException]] = []
    t0 = time.perf_counter()
    new_tokens = 0
    with progress_bar(total_bytes / 1e6, "tokenize", unit="MB", enabled=show_progress) as bar:
        bar.advance(sum(s for tid, _, s in tasks if tid in results) / 1e6)

        def _done(task_id, size, stats):
            nonlocal new_tokens
            results[task_id] = stats
            new_tokens += stats["tokens"]
            bar.advance(size / 1e6)
            rate = new_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(f"{new_tokens:,} tokens, {rate:,.0f} tokens/s")

        if workers <= 1 or len(pending) <= 1:
            for task_id, kwargs, size in pending:
                try:
                    _done(task_id, size, _run_one(task_id, state_dir, kwargs))
                except Exception as err:  # noqa: BLE001 - reported below, naming the shard
                    failures.append((kwargs["shard"], err))
        else:
            ctx = mp.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futs = {pool.submit(_run_one, tid, state_dir, kw): (tid, kw, size) for tid, kw, size in pending}
                for fut in as_completed(futs):
                    tid, kw, size = futs[fut]
                    try:
                        _done(tid, size, fut.result())
                    except Exception as err:  # noqa: BLE001
                        failures.append((kw["shard"], err))
    elapsed = time.perf_counter() - t0
    if failures:
        shard, err = failures[0]
        msg = str(err) if isinstance(err, HibariError) else f"{type(err).__name__}: {err}"
        more = f" (and {len(failures) - 1} more shards)" if len(failures) > 1 else ""
        raise HibariError(f"{shard}: tokenize failed: {msg}{more}; rerun to retry only the failed shards")

    ordered = [results[tid] for tid, _, _ in tasks]
    n_seq, n_tok = merge_datasets([kw["part_prefix"] for _, kw, _ in tasks], output_prefix)
    summary = {"output": str(output_prefix), "tokenizer": enc.name, "vocab_size": enc.vocab_size,
               "dtype": np.dtype(token_dtype_for_vocab(enc.vocab_size)).name, "shards": len(tasks),
               "documents": n_seq, "tokens": n_tok,
               "characters": sum(s["characters"] for s in ordered),
               "skipped_missing_text": sum(s["skipped_missing_text"] for s in ordered),
               "skipped_empty": sum(s["skipped_empty"] for s in ordered),
               "skipped_undecodable": sum(s["skipped_undecodable"] for s in ordered),
               "append_eod": append_eod, "add_bos": add_bos, "seconds_this_run": round(elapsed, 3),
               "tokens_per_second_this_run": round(new_tokens / elapsed, 1) if elapsed > 0 else None}
    with atomic_write(stats_path, "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    if not keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return summary
