"""`hibari corpus export`: a cleaned / deduplicated / annotated corpus as parquet shards or a `save_to_disk` dataset.

The result loads without custom code: `datasets.load_dataset("parquet", data_files="OUT/data/*.parquet")` (or
`load_dataset("OUT")`, the README's YAML header names the files) for `--format parquet`, `datasets.load_from_disk(OUT)`
for `--format hf`. Columns: the record fields (id, text, url, host, date, snapshot, warc_file, ...), the quality
features of `corpus annotate` flattened to `quality_<name>`, and any classifier score / keep / reasons fields. The
column set and types come from the first record of every input; a later record's field outside it, or a value of
another type, is counted (`fields_not_exported`, `values_not_exported`) and shown in the card, never dropped silently.
The output is built in a temporary sibling directory and renamed at the end: a failed export leaves no partial OUT.
`OUT/export.json` records what OUT was made from (`provenance`: input files with size and mtime, format, split,
name, report files): the same command again is a no-op, other inputs or options into an existing OUT are refused
naming the change unless `--overwrite` (`data_pipeline.executor.provenance`, the mechanism of every stage).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from data_pipeline.corpus.export_card import find_stage_reports, write_card
from data_pipeline.executor.provenance import check_output, source_identity
from data_pipeline.executor.tasks import read_marker
from hibari.errors import HibariError
from hibari.io import staged_dir
from hibari.progress import progress_bar

FORMATS = ("parquet", "hf")
FEATURES_FIELD = "features"  # the dict `corpus annotate` adds; exported as quality_<name> columns
FEATURE_PREFIX = "quality_"
_ROWS_PER_GROUP = 2048  # parquet row group: bounded memory when writing and when streaming it back


def register_corpus_commands(sub) -> None:
    from data_pipeline.readers import FORMATS_HELP, add_input_arguments

    p = sub.add_parser("export", help="corpus shards -> parquet shards or a datasets save_to_disk dir + dataset card",
                       description="Export documents (e.g. the output of corpus clean / dedup / annotate) as "
                                   "parquet shards (`--format parquet`, loadable by datasets.load_dataset('parquet', "
                                   "...)) or a `save_to_disk` directory (`--format hf`, datasets.load_from_disk), with "
                                   "a README dataset card built from the stage reports found next to the inputs.")
    add_input_arguments(p, text_key=False, text_format=False,
                        help=f"corpus directories (searched recursively) or {FORMATS_HELP}; several")
    p.add_argument("--out", required=True, help="output directory (an existing one made from other inputs or "
                                                "options is refused, unless --overwrite)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="parquet shards or a save_to_disk dataset")
    p.add_argument("--reports", nargs="+", action="extend", default=[], metavar="DIR",
                   help="stage output dirs (corpus clean / dedup) whose reports go into the card, when the inputs are "
                        "a later stage's output (default: found from the input dirs)")
    p.add_argument("--name", default=None, help="dataset name in the card (default: the --out directory name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out made from other inputs or options (or by another tool)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_run)


def _run(args) -> int:
    summary = export_corpus(args.input, args.out, fmt=args.format, split=args.split, name=args.name,
                            overwrite=args.overwrite, show_progress=not args.quiet, report_dirs=args.reports)
    lost = sum(summary["fields_not_exported"].values()) + sum(summary["values_not_exported"].values())
    done = " (already done: same inputs and options)" if summary.get("already_done") else ""
    print(f"corpus export: {summary['documents']:,} documents in {summary['files']} {args.format} file(s) -> "
          f"{args.out} (README.md dataset card){f'; {lost:,} field values not exported, see the card' if lost else ''}"
          f"{done}")
    return 0


def export_corpus(inputs, out_dir, fmt: str = "parquet", *, split: str | None = None, name: str | None = None,
                  overwrite: bool = False, show_progress: bool = True, report_dirs: list[str] | None = None) -> dict:
    from data_pipeline.readers import iter_records, resolve_inputs

    if fmt not in FORMATS:
        raise HibariError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "hf":
        try:
            import datasets  # noqa: F401 - only needed to write the save_to_disk layout
        except ImportError:
            raise HibariError("--format hf needs the `datasets` package (pip install 'hibari[hf]'); "
                              "--format parquet does not") from None
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise HibariError(f"--out {out}: exists and is not a directory")
    sources = resolve_inputs(inputs, split=split)
    for inp in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        if Path(inp).is_dir() and (out == Path(inp).resolve() or out.is_relative_to(Path(inp).resolve())):
            raise HibariError(f"--out {out}: must not be an input directory or inside one")
    reports = find_stage_reports(inputs, sources, report_dirs or [])
    provenance = {"inputs": [source_identity(s) for s in sources],
                  "options": {"format": fmt, "split": split, "name": name or out.name},
                  "reports": sorted(v["path"] for v in reports.values())}
    record_path = out / "export.json"
    old = check_output(record_path, provenance, f"--out {out}", overwrite,
                       has_results=out.is_dir() and any(out.iterdir()), field="provenance")
    if old is None and record_path.exists():  # the same export again: nothing to do
        done = read_marker(record_path) or {}
        return {**{k: v for k, v in done.items() if k not in ("reports", "provenance")}, "already_done": True}
    schema = infer_schema(sources)
    t0 = time.perf_counter()
    stats = {"documents": 0, "characters": 0, "snapshots": Counter(), "fields_not_exported": Counter(),
             "values_not_exported": Counter()}
    with staged_dir(out) as tmp:  # the export appears whole or not at all
        (tmp / "data").mkdir()
        files = []
        with progress_bar(sum(s.size for s in sources) / 1e6, "export", unit="MB", enabled=show_progress) as bar:
            for i, src in enumerate(sources):
                path = tmp / "data" / f"train-{i:05d}-of-{len(sources):05d}.parquet"
                n = _write_parquet(iter_records(src), schema, path, stats)
                files.append({"file": path.name, "source": src.label, "documents": n})
                bar.advance(src.size / 1e6)
        if fmt == "hf":
            _to_save_to_disk(tmp, files, show_progress)
        summary = {"format": fmt, "files": len(files), "documents": stats["documents"],
                   "characters": stats["characters"], "snapshots": dict(sorted(stats["snapshots"].items())),
                   "fields_not_exported": dict(stats["fields_not_exported"]),
                   "values_not_exported": dict(stats["values_not_exported"]),
                   "columns": {c: t for c, t in schema}, "inputs": [s.label for s in sources], "shards": files,
                   "seconds": round(time.perf_counter() - t0, 3)}
        write_card(tmp / "README.md", name or out.name, summary, reports, fmt)
        with open(tmp / "export.json", "w", encoding="utf-8") as f:
            json.dump({**summary, "reports": {k: v["path"] for k, v in reports.items()}, "provenance": provenance}, f,
                      ensure_ascii=False, indent=1)
    return summary


# --------------------------------------------------------------------------------------------- schema
def _type_of(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list<string>"
    if isinstance(value, dict):
        return "json"  # a nested object other than the quality features: stored as a JSON string
    return None


def _merge(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b if a is None else a
    if {a, b} <= {"int64", "float64"}:
        return "float64"
    return "string"


def infer_schema(sources) -> list[tuple[str, str]]:
    """(column, type) from the first record of every source: record fields in first-seen order, `text` first,
    the quality features flattened to quality_<name>."""
    from data_pipeline.readers import iter_records

    types: dict[str, str | None] = {"text": "string"}
    for src in sources:
        first = next(iter(iter_records(src)), None)
        if first is None:
            continue
        for key, value in first.items():
            if key == FEATURES_FIELD and isinstance(value, dict):
                for fname, fvalue in value.items():
                    col = FEATURE_PREFIX + fname
                    types[col] = _merge(types.get(col), _type_of(fvalue))
            else:
                types[key] = _merge(types.get(key), _type_of(value))
    return [(k, t or "string") for k, t in types.items()]


def _arrow_type(t: str):
    import pyarrow as pa

    return {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
            "json": pa.string(), "list<string>": pa.list_(pa.string())}[t]


def _convert(value, t: str):
    """The value in column type `t`; raises TypeError when it does not fit (counted by the caller)."""
    if value is None:
        return None
    if t == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if t == "json":
        return json.dumps(value, ensure_ascii=False)
    if t == "bool" and isinstance(value, bool):
        return value
    if t == "int64" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if t == "float64" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if t == "list<string>" and isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value]
    raise TypeError(t)


def _write_parquet(records, schema: list[tuple[str, str]], path: Path, stats: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_schema = pa.schema([(c, _arrow_type(t)) for c, t in schema])
    known = {c for c, _ in schema}
    columns: dict[str, list] = {c: [] for c, _ in schema}
    n = 0

    def flush(writer):
        if columns["text"]:
            writer.write_table(pa.table({c: pa.array(columns[c], type=_arrow_type(t)) for c, t in schema},
                                        schema=arrow_schema), row_group_size=_ROWS_PER_GROUP)
            for values in columns.values():
                values.clear()

    with pq.ParquetWriter(path, arrow_schema, compression="zstd") as writer:
        for rec in records:
            flat = dict(rec)
            feats = flat.pop(FEATURES_FIELD, None) if isinstance(rec.get(FEATURES_FIELD), dict) else None
            for fname, fvalue in (feats or {}).items():
                flat[FEATURE_PREFIX + fname] = fvalue
            for key in flat.keys() - known:
                stats["fields_not_exported"][key] += 1
            for col, t in schema:
                try:
                    columns[col].append(_convert(flat.get(col), t))
                except TypeError:
                    columns[col].append(None)
                    stats["values_not_exported"][col] += 1
            n += 1
            text = rec.get("text")
            stats["characters"] += len(text) if isinstance(text, str) else 0
            snap = rec.get("snapshot")
            stats["snapshots"][snap if isinstance(snap, str) else "(none)"] += 1
            if len(columns["text"]) >= _ROWS_PER_GROUP:
                flush(writer)
        flush(writer)
    stats["documents"] += n
    return n


def _to_save_to_disk(tmp: Path, files: list[dict], show_progress: bool) -> None:
    """Turn tmp/data/*.parquet into a save_to_disk dataset at tmp (the parquet files are removed after)."""
    import datasets

    if not show_progress:
        datasets.disable_progress_bars()

    parquet = [str(tmp / "data" / f["file"]) for f in files]
    cache = tmp / "_cache"
    ds = datasets.Dataset.from_parquet(parquet, cache_dir=str(cache), keep_in_memory=False)
    staging = tmp / "_saved"
    ds.save_to_disk(str(staging), num_shards=max(1, len(files)))
    del ds
    shutil.rmtree(tmp / "data")
    shutil.rmtree(cache, ignore_errors=True)
    for item in staging.iterdir():
        os.replace(item, tmp / item.name)
    staging.rmdir()
