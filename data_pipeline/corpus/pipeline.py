"""`hibari corpus clean`: one resumable task per WARC file -> `OUTPUT/<stem>.jsonl.zst`, its drop ledger
`OUTPUT/_ledger/<stem>.dropped.jsonl.zst`, plus the funnel report.

The output records what it was made from (`OUTPUT/.state/run.json`: absolute input paths with size and mtime, the
resolved config, ledger options); a rerun with other inputs or config is refused naming the change, unless
`overwrite=True`, which first removes exactly the files the earlier run made.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.ledger import LEDGER_DIR, LedgerWriter, ledger_path
from data_pipeline.corpus.report import EXAMPLES_PER_REASON, READ_STAGE, build_report, write_report
from data_pipeline.corpus.warc import SkippedRecord, iter_warc, snapshot_from
from data_pipeline.executor import Task, run_local
from data_pipeline.executor.provenance import check_output, file_identity, resource_digests, write_provenance
from hibari.errors import HibariError
from hibari.io import ensure_writable_dir, expand_inputs, write_jsonl
from hibari.progress import progress_bar

_WARC_SUFFIXES = (".warc.gz", ".warc.zst", ".warc", ".arc.gz", ".arc", ".gz")
STATE_DIR = ".state"
RUN_RECORD = "run.json"
REPORT_FILES = ("report.json", "report.md", "funnel.png")


def output_stem(path: Path) -> str:
    name = path.name
    for suffix in _WARC_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def clean_shard(warc_path: str, out_path: str, cfg_data: dict, show_progress: bool = False,
                ledger: str | None = None, keep_dropped_text: bool = False) -> dict:
    """Clean one WARC file into `out_path` and its drop ledger into `ledger` (both written atomically). Returns the
    shard's counters; records_read == written + dropped.

    Never raises for bad data: damaged files, odd pages and even unexpected per-page errors are counted skips."""
    from data_pipeline.corpus.steps import build_steps, page_from_response

    cfg = CleanConfig.model_validate(cfg_data)
    path = Path(warc_path)
    steps = build_steps(cfg)
    read = {"records": 0, "huge_page": 0, "truncated_record": 0, "damaged_record": 0, "read_error": 0}
    internal_errors: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    state = {"snapshot": cfg.snapshot, "responses": 0, "items": 0}
    total_bytes = max(path.stat().st_size, 1) if path.exists() else 1
    max_block = cfg.read.max_page_bytes + 65536  # room for the HTTP header block
    ledger = ledger or str(ledger_path(Path(out_path).parent, output_stem(Path(out_path))))

    def dropped(book: LedgerWriter, rid: str, url: str, stage: str, reason: str, value: str, text=None) -> None:
        entry = {"id": rid, "url": url, "snapshot": state["snapshot"] or "unknown", "warc_file": path.name,
                 "stage": stage, "reason": reason, "value": value}
        if keep_dropped_text:
            entry["text"] = text or None
        book.write(entry)
        urls = examples.setdefault(f"{stage}/{reason}", [])
        if len(urls) < EXAMPLES_PER_REASON and url not in urls:
            urls.append(url)

    # a batched last stage (the classifier) gets the pages every other stage kept, `batch_size` at a time
    batched = steps[-1] if getattr(steps[-1], "batched", False) else None
    per_page = steps[:-1] if batched else steps
    pending: list = []

    def record_of(page) -> dict:
        return {**page.record(), **(getattr(page, "scores", None) or {})}  # + the classifier's score, if any

    def finish_batch(book: LedgerWriter):
        pages = pending[:]
        pending.clear()
        try:
            batched.score_batch(pages)
        except Exception as err:  # noqa: BLE001 - counted like a per-page error, for each page of the batch
            key = f"{type(err).__name__}"
            internal_errors[key] = internal_errors.get(key, 0) + len(pages)
            for page in pages:
                dropped(book, page.id, page.url, batched.name, f"internal_error:{key}", str(err)[:200], page.text)
            return
        for page in pages:
            try:
                kept = batched(page) is not None
            except Exception as err:  # noqa: BLE001 - one bad page must not crash the shard; counted
                key = f"{type(err).__name__}"
                internal_errors[key] = internal_errors.get(key, 0) + 1
                dropped(book, page.id, page.url, batched.name, f"internal_error:{key}", str(err)[:200], page.text)
                continue
            if kept:
                yield record_of(page)
            else:
                dropped(book, page.id, page.url, *page.drop, text=page.text)

    def survivors(bar, book: LedgerWriter):
        yield from _survivors(bar, book)
        if pending:
            yield from finish_batch(book)

    def _survivors(bar, book: LedgerWriter):
        for item in iter_warc(path, read, max_block, on_progress=lambda pos: bar.advance(pos - bar.done)):
            state["items"] += 1
            if isinstance(item, str):
                if state["snapshot"] is None:
                    state["snapshot"] = snapshot_from(item[len("warcinfo:"):], path.name)
                continue
            if state["snapshot"] is None:
                state["snapshot"] = snapshot_from("", path.name)
            if isinstance(item, SkippedRecord):
                dropped(book, item.record_id, item.url, READ_STAGE, item.reason, item.value)
                continue
            state["responses"] += 1
            if show_progress and state["responses"] % 200 == 0:
                bar.set_postfix(f"{state['responses'] / (time.perf_counter() - t0):.0f} pages/s")
            page = page_from_response(item, state["snapshot"], path.name)
            stage = ""
            try:
                for step in per_page:
                    stage = step.name
                    if step(page) is None:
                        dropped(book, page.id, page.url, *page.drop, text=page.text)
                        break
                else:
                    if batched is None:
                        yield page.record()
                    else:
                        pending.append(page)
            except Exception as err:  # noqa: BLE001 - one bad page must not crash the shard; counted
                key = f"{type(err).__name__}"
                internal_errors[key] = internal_errors.get(key, 0) + 1
                dropped(book, page.id, page.url, stage, f"internal_error:{key}", str(err)[:200], text=page.text)
            if batched is not None and len(pending) >= batched.batch_size:
                yield from finish_batch(book)

    with progress_bar(total_bytes, f"clean {path.name}", unit="B", enabled=show_progress) as bar, \
            LedgerWriter(ledger, level=cfg.zstd_level) as book:
        written = write_jsonl(out_path, survivors(bar, book), level=cfg.zstd_level)
    if not read.get("read_error") and not state["items"]:  # not even a warcinfo record: say so
        read["read_error"] = 1
        read["read_error_message"] = ("empty file (0 bytes)" if path.stat().st_size == 0 else
                                      "no response or warcinfo record in it (not a WARC file, or other record "
                                      "types only)")
    read_stage = {"name": READ_STAGE, "pages_in": read["records"], "pages_out": state["responses"],
                  "chars_in": 0, "chars_out": 0,
                  "drops": {k: v for k, v in read.items() if k in ("huge_page", "truncated_record", "damaged_record")
                            and v}}
    stats = {
        "warc_file": path.name, "output": Path(out_path).name, "ledger": f"{LEDGER_DIR}/{Path(ledger).name}",
        "snapshot": state["snapshot"] or "unknown", "records_read": read["records"], "written": written,
        "dropped": book.count, "elapsed_s": round(time.perf_counter() - t0, 3),
        "read_error": read.get("read_error", 0), "read_error_message": read.get("read_error_message", ""),
        "internal_errors": internal_errors, "examples": examples,
        "stages": [read_stage] + [s.stats() for s in steps],
    }
    if read["records"] != written + book.count:  # the ledger's promise; a bug here must not pass silently
        raise RuntimeError(f"{path}: {read['records']} records read but {written} kept + {book.count} dropped")
    extra = getattr(steps[1], "categories_missing", None)
    if extra:
        stats["blocklist_categories_missing"] = extra
    return stats


def _remove_previous(out: Path, old: dict) -> None:
    """--overwrite: remove exactly what an earlier run recorded making (shards, ledgers, state, report)."""
    for name in old.get("outputs", []):
        (out / name).unlink(missing_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def run_clean(input_glob, output_dir: str, cfg: CleanConfig, workers: int = 1, show_progress: bool = True,
              runner=None, overwrite: bool = False, keep_dropped_text: bool = False) -> dict:
    """Plan and run one task per input file (skipping completed ones), then write the funnel report.

    `runner` runs the tasks (default `run_local`; `data_pipeline.executor.make_runner(args)` for --executor)."""
    if workers < 1:
        raise HibariError(f"--workers {workers}: expected a positive number")
    inputs = list(dict.fromkeys(p.absolute() for p in expand_inputs(input_glob)))  # a file named twice is one input
    out = ensure_writable_dir(output_dir).resolve()
    stems: dict[str, Path] = {}
    for p in inputs:
        stem = output_stem(p)
        if stem in stems:
            raise HibariError(f"inputs {stems[stem]} and {p} map to the same output {stem}.jsonl.zst (and task id); "
                              "rename one of them")
        stems[stem] = p
    # validate the config (and its word/block lists) in the parent before any task starts
    from data_pipeline.corpus.steps import build_steps
    build_steps(cfg)
    cfg_data = cfg.model_dump(mode="json")
    state_dir = out / STATE_DIR
    outputs = [f"{stem}.jsonl.zst" for stem in stems] + [f"{LEDGER_DIR}/{ledger_path(out, stem).name}"
                                                          for stem in stems]
    record = {"inputs": [file_identity(p) for p in stems.values()], "config": cfg_data,
              "options": {"keep_dropped_text": keep_dropped_text}, "outputs": outputs}
    resources = {name: resource_digests(paths) for name, paths in (
        ("classifier_model", [cfg.classifier.model] if cfg.classifier.model else []),
        ("ngword_lists", cfg.ngword.paths or []), ("blocklist_custom_lists", cfg.blocklist.custom_lists)) if paths}
    if resources:  # a retrained model or an edited list at the same path is a change too
        record["resources"] = resources
    record_path = state_dir / RUN_RECORD
    old = check_output(record_path, record, f"--output {out}", overwrite,
                       has_results=(state_dir / "done").is_dir() or any(out.glob("*.jsonl.zst")))
    if old == {} and not record_path.exists():  # unrecorded results (--overwrite): the shards found are theirs
        old = {"outputs": [p.name for p in out.glob("*.jsonl.zst")]}
    if old is not None:
        _remove_previous(out, old)
    write_provenance(record_path, record)
    tasks = [Task(task_id=stem, fn=clean_shard, label=str(p),
                  kwargs={"warc_path": str(p), "out_path": str(out / f"{stem}.jsonl.zst"), "cfg_data": cfg_data,
                          "show_progress": show_progress and workers == 1 and runner is None,
                          "ledger": str(ledger_path(out, stem)), "keep_dropped_text": keep_dropped_text},
                  fingerprint=file_identity(p),
                  outputs=(str(out / f"{stem}.jsonl.zst"), str(ledger_path(out, stem))))
             for stem, p in stems.items()]
    t0 = time.perf_counter()
    results = (runner or run_local)(tasks, state_dir, workers=workers, desc="corpus clean",
                                    show_progress=show_progress)
    report = build_report(list(results.values()))
    report["wall_s_this_run"] = round(time.perf_counter() - t0, 3)
    report["output"] = str(out)
    write_report(report, out)
    return report


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))
