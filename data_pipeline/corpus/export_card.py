"""The README dataset card of `hibari corpus export`, built from the stage reports found next to the inputs.

Reports looked for: `_dedup/report.json` in an input directory (dedup settings and counts; its state manifest
names the shards it read, whose directory holds the clean report), `report.json` of `corpus clean` in an input
directory or the dedup inputs' directory (funnel, drop reasons, filter settings when recorded). A missing report
is said so in the card, never invented.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from hibari.errors import HibariError


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def find_stage_reports(inputs, sources, report_dirs: list[str]) -> dict[str, dict]:
    """{"dedup": {"path", "report"}, "clean": {...}} for the reports found (either may be missing): in
    `report_dirs` first, then the input dirs and the dirs of the input files."""
    for d in report_dirs:
        if not Path(d).is_dir():
            raise HibariError(f"--reports {d}: not a directory (expected a corpus clean or dedup output dir)")
    dirs = [Path(d).resolve() for d in report_dirs]
    dirs += [Path(p).resolve() for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs) if Path(p).is_dir()]
    dirs += sorted({Path(s.path).parent for s in sources} - set(dirs))
    found: dict[str, dict] = {}
    for d in dirs:
        dedup = _load(d / "_dedup" / "report.json")
        if dedup is not None and "dedup" not in found:
            found["dedup"] = {"path": str(d / "_dedup" / "report.json"), "report": dedup}
            manifest = d / "_dedup" / "state" / "shards.json"
            try:
                shard_inputs = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                shard_inputs = []
            for s in shard_inputs if isinstance(shard_inputs, list) else []:
                if isinstance(s, dict) and isinstance(s.get("input"), str):
                    dirs.append(Path(s["input"]).parent)
        clean = _load(d / "report.json")
        if clean is not None and "stages" in clean and "clean" not in found:
            found["clean"] = {"path": str(d / "report.json"), "report": clean}
    return found


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_card(path: Path, name: str, summary: dict, reports: dict, fmt: str) -> None:
    lines = []
    if fmt == "parquet":  # lets `datasets.load_dataset(OUT)` find the files without arguments
        lines += ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
                  "    path: data/*.parquet", "---", ""]
    load = ('datasets.load_dataset("parquet", data_files="OUT/data/*.parquet", split="train")' if fmt == "parquet"
            else 'datasets.load_from_disk("OUT")')
    lines += [f"# {name}", "",
              f"Exported by `hibari corpus export --format {fmt}` on "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: {summary['documents']:,} documents, "
              f"{summary['characters']:,} characters, {summary['files']} file(s).", "",
              "Load it with:", "", "```python", "import datasets", f"ds = {load}", "```", "",
              "## Columns", ""]
    lines += _table(["column", "type"], [[f"`{c}`", t] for c, t in summary["columns"].items()])
    if summary["fields_not_exported"] or summary["values_not_exported"]:
        lines += ["", f"Not exported (counted): fields outside the column set {summary['fields_not_exported']}; "
                      f"values of another type {summary['values_not_exported']}."]
    lines += ["", "## Source snapshots", ""]
    lines += _table(["snapshot", "documents"], [[s, f"{n:,}"] for s, n in summary["snapshots"].items()])
    lines += ["", "## Inputs", ""] + [f"- `{i}`" for i in summary["inputs"][:50]]
    if len(summary["inputs"]) > 50:
        lines.append(f"- ... and {len(summary['inputs']) - 50} more (all in export.json)")
    lines += ["", "## Funnel, filters and thresholds (corpus clean)", ""]
    clean = reports.get("clean")
    if clean is None:
        lines.append("No `corpus clean` report found next to the inputs.")
    else:
        r = clean["report"]
        written = r.get("documents_written")
        written = f"{written:,}" if isinstance(written, int) else "?"
        lines.append(f"From `{clean['path']}`: {written} documents written from {r.get('shards', '?')} WARC shard(s).")
        lines += [""] + _table(["stage", "pages in", "pages out"],
                               [[s.get("name"), f"{s.get('pages_in', 0):,}", f"{s.get('pages_out', 0):,}"]
                                for s in r.get("stages", [])])
        reasons = list((r.get("drop_reasons") or {}).items())
        if reasons:
            lines += ["", "Drop reasons (stage/reason: pages):", ""]
            lines += [f"- {k}: {v:,}" for k, v in reasons[:30]]
        config = r.get("config")
        lines += ["", "Filter settings: " + (f"`{json.dumps(config, ensure_ascii=False)}`" if config else
                                             "not recorded in the clean report (the shipped defaults unless the run "
                                             "passed --config / --set).")]
    lines += ["", "## Deduplication", ""]
    dedup = reports.get("dedup")
    if dedup is None:
        lines.append("No `corpus dedup` report found next to the inputs.")
    else:
        r = dedup["report"]
        p = r.get("params", {})
        lines.append(f"From `{dedup['path']}`: MinHash-LSH over character {p.get('ngram')}-grams, {p.get('bands')} "
                     f"bands x {p.get('rows')} rows (seed {p.get('seed')}), keep {p.get('keep')}; host filter "
                     f"{'on' if p.get('host_filter') else 'off'} (removed share > {p.get('host_threshold')}, "
                     f">= {p.get('host_min_pages')} pages, counting {p.get('host_count')}).")
        lines += [""] + _table(["documents in", "near-duplicates removed", "removed by host filter", "documents out"],
                               [[f"{r.get(k):,}" if isinstance(r.get(k), int) else "?"
                                 for k in ("docs_in", "dup_removed", "host_removed", "docs_out")]])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
