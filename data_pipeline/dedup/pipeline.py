"""The dedup stage end to end: signatures -> LSH bands -> clusters + host filter -> apply -> report.

Each step is a list of executor tasks with completion markers in `OUTPUT/_dedup/state/done/`, so a killed run
resumes where it stopped and a finished run is a no-op (the report is rewritten). `OUTPUT/_dedup/state/run.json`
records what the output is made from (input shards with size and mtime, the parameters, the --previous run): a
rerun with other inputs or parameters is refused naming the change, unless `overwrite=True`, which first removes
the shards, removal lists, state and report of the earlier run (`data_pipeline.executor.provenance`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from data_pipeline.dedup import stages
from data_pipeline.dedup.report import write_report
from data_pipeline.executor import Task, run_local
from data_pipeline.executor.provenance import check_output, resource_digests, source_identity, write_provenance
from data_pipeline.executor.tasks import read_marker
from data_pipeline.readers import DocumentSource, resolve_inputs
from hibari.io import atomic_write, ensure_writable_dir
from hibari.config import StrictModel
from hibari.errors import HibariError

DEDUP_DIR = "_dedup"  # inside OUTPUT: state, removal lists and report; deduplicated shards sit beside it
SHARD_SUFFIXES = (".jsonl.zst", ".jsonl")
RUN_RECORD = "run.json"  # in OUTPUT/_dedup/state: inputs, parameters, previous run, output shard names
# parameters that make stored signatures incompatible when they differ
SIGNATURE_PARAMS = ("ngram", "bands", "rows", "seed")


class DedupConfig(StrictModel):
    ngram: int = Field(5, ge=1, description="character n-gram length")
    bands: int = Field(40, ge=1, description="LSH bands")
    rows: int = Field(20, ge=1, description="MinHash values per band")
    seed: int = Field(1, ge=0, description="seed of the hash functions (signatures only compare under one seed)")
    keep: Literal["newest", "oldest"] = "newest"
    memory_mb: int = Field(1024, ge=1, description="working-memory budget of one LSH band task")
    host_threshold: float = Field(0.8, ge=0.0, le=1.0, description="drop hosts whose removed share is above this")
    host_min_pages: int = Field(10, ge=1, description="hosts with fewer pages are never dropped")
    host_count: Literal["other_host", "all"] = "other_host"
    host_filter: bool = True
    save_minhash: bool = False
    plot: bool = Field(True, description="also draw cluster_sizes.png (imports matplotlib)")
    batch_docs: int = Field(256, ge=1)


def discover_shards(inputs, split: str | None = None) -> list[tuple[str, DocumentSource]]:
    """(key, source) of every shard of `inputs` (dirs, files, globs of any `data_pipeline.readers` format); key =
    the output name: the path relative to its input dir for JSONL shards, `<stem>.jsonl.zst` for other formats.
    Names under `_`/`.` dirs (this stage's `_dedup/`) are skipped."""
    found = []
    for src in resolve_inputs(inputs, split=split):
        keep_name = src.row_groups is None and src.key.endswith(SHARD_SUFFIXES)
        found.append((src.key if keep_name else src.stem + ".jsonl.zst", src))
    return found


def _task_name(prefix: str, key: str) -> str:
    return prefix + "-" + key.replace("/", "__")


def _load_previous(previous: Path, config: DedupConfig) -> list[dict]:
    state = previous / DEDUP_DIR / "state"
    manifest, record = state / "shards.json", read_marker(state / RUN_RECORD)
    if not manifest.is_file() or not isinstance((record or {}).get("config"), dict):
        raise HibariError(f"--previous {previous}: no finished dedup run there (missing {manifest} or "
                          f"{state / RUN_RECORD})")
    old = record["config"]
    for k in SIGNATURE_PARAMS:
        if old.get(k) != getattr(config, k):
            raise HibariError(f"--previous {previous}: its signatures use {k}={old.get(k)}, this run "
                              f"{k}={getattr(config, k)}; signatures are only comparable with equal {k}")
    shards = json.loads(manifest.read_text(encoding="utf-8"))
    for s in shards:
        if not Path(s["input"]).is_file():
            raise HibariError(f"--previous {previous}: its input shard {s['input']} is gone "
                              f"(needed to write the deduplicated output of earlier snapshots)")
    return shards


def run_dedup(input_dir, output_dir: str | Path, config: DedupConfig | None = None,
              previous: str | Path | None = None, workers: int = 1, runner=run_local,
              show_progress: bool = True, split: str | None = None, overwrite: bool = False) -> dict:
    """Deduplicate all shards under `input_dir` (plus the shards of a `previous` run's output, whose stored
    signatures are reused) into `output_dir`. Returns the report dict (also in OUTPUT/_dedup/report.json).

    `runner` executes each step's tasks; it has `run_local`'s signature (`data_pipeline.executor.make_runner(args)`
    gives a SLURM array runner for --executor slurm, using the same completion markers). An output made from other
    inputs or parameters is refused naming the change, unless `overwrite`."""
    config = config or DedupConfig()
    output_dir = Path(output_dir).resolve()
    for inp in [input_dir] if isinstance(input_dir, (str, Path)) else input_dir:
        inp = Path(inp).resolve()
        if inp.is_dir() and (output_dir == inp or output_dir.is_relative_to(inp)):
            raise HibariError(f"--output {output_dir}: must not be an input directory or inside one")
    if previous and Path(previous).resolve() == output_dir:
        raise HibariError(f"--previous {previous}: must differ from --output (the earlier run's output stays as is)")
    new_shards = discover_shards(input_dir, split)
    prev_shards = _load_previous(Path(previous).resolve(), config) if previous else []
    prev_keys = {s["key"] for s in prev_shards}
    clash = sorted(k for k, _ in new_shards if k in prev_keys)
    if clash:
        raise HibariError(f"input shard {clash[0]}: also a shard of --previous {previous}; shard names must be "
                          f"unique across snapshots (e.g. prefix them with the snapshot name)")
    ensure_writable_dir(output_dir)
    dd = output_dir / DEDUP_DIR
    state = dd / "state"
    previous_record = Path(previous).resolve() / DEDUP_DIR / "state" / RUN_RECORD if previous else None
    record = {"inputs": [source_identity(src) for _, src in new_shards],
              "config": config.model_dump(exclude={"batch_docs", "plot"}),  # these two do not change results
              "previous": resource_digests([previous_record]) if previous else None,
              "outputs": [key for key, _ in new_shards] + [s["key"] for s in prev_shards]}
    old = check_output(state / RUN_RECORD, record, f"--output {output_dir}", overwrite,
                       has_results=dd.exists() or any((output_dir / key).exists() for key in record["outputs"]))
    if old is not None:
        for key in old.get("outputs", []):  # exactly the shards the earlier run wrote, then its state and report
            (output_dir / key).unlink(missing_ok=True)
        shutil.rmtree(dd, ignore_errors=True)
    write_provenance(state / RUN_RECORD, record)
    t0 = time.perf_counter()
    timings = {}

    # 1. signatures, one task per new shard
    sig_dir = state / "sig"
    sig_tasks = [Task(_task_name("sig", key), stages.signature_task,
                      (path.to_dict(), key, str(sig_dir), config.ngram, config.bands, config.rows, config.seed),
                      {"batch_docs": config.batch_docs, "save_minhash": config.save_minhash}, label=path.label,
                      outputs=stages.sig_paths(sig_dir, key))
                 for key, path in new_shards]
    sig_stats = runner(sig_tasks, state, workers, desc="dedup signatures", show_progress=show_progress)
    timings["signatures_s"] = time.perf_counter() - t0

    shards = [{k: s[k] for k in ("key", "input", "source", "sig_dir", "docs", "invalid") if k in s}
              for s in prev_shards]
    for (key, path), task in zip(new_shards, sig_tasks):
        st = sig_stats[task.task_id]
        shards.append({"key": key, "input": path.path, "source": path.to_dict(), "sig_dir": str(sig_dir),
                       "docs": st["docs"], "invalid": st["invalid"]})
    offset = 0
    for s in shards:
        s["offset"] = offset
        offset += s["docs"]
    with atomic_write(state / "shards.json", "w") as f:
        json.dump(shards, f, ensure_ascii=False, indent=1)

    # 2. LSH, one task per band
    t1 = time.perf_counter()
    (state / "edges").mkdir(parents=True, exist_ok=True)
    band_tasks = [Task(f"band-{b:03d}", stages.band_task,
                       (b, shards, str(state / "edges" / f"band-{b:03d}.i64"), config.memory_mb << 20))
                  for b in range(config.bands)]
    band_stats = runner(band_tasks, state, workers, desc="dedup LSH bands", show_progress=show_progress)
    timings["lsh_s"] = time.perf_counter() - t1

    # 3. clusters, keep policy, host decisions (one task over all edges)
    t2 = time.perf_counter()
    threshold = config.host_threshold if config.host_filter else 1.0  # a removed share is never above 1
    cluster_stats = runner([Task("clusters", stages.cluster_task,
                                    (str(state), shards, config.bands, config.keep, threshold,
                                     config.host_min_pages, config.host_count))],
                              state, 1, desc="dedup clusters", show_progress=show_progress)["clusters"]
    timings["clusters_s"] = time.perf_counter() - t2

    # 4. apply, one task per shard (earlier snapshots' shards too: newer copies can remove their documents)
    t3 = time.perf_counter()
    apply_tasks = []
    for s in shards:
        key = s["key"]
        stem = key[: -len(".jsonl.zst")] if key.endswith(".jsonl.zst") else key[: -len(".jsonl")]
        apply_tasks.append(Task(_task_name("apply", key), stages.apply_task,
                                (s.get("source") or s["input"], key, s["docs"], str(state / "clusters" / (key + ".npz")),
                                 str(state / "hosts_dropped.json"), str(output_dir / key),
                                 str(dd / "removed" / (stem + ".removed.jsonl.zst"))), label=s["input"],
                                outputs=(str(output_dir / key), str(dd / "removed" / (stem + ".removed.jsonl.zst")))))
    apply_stats = runner(apply_tasks, state, workers, desc="dedup apply", show_progress=show_progress)
    timings["apply_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    return write_report(dd, config, shards, list(sig_stats.values()), list(band_stats.values()), cluster_stats,
                        list(apply_stats.values()), timings, previous=str(previous) if previous else None)
