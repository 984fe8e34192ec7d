"""`hibari corpus clean`: one resumable task per WARC file -> `OUTPUT/<stem>.jsonl.zst`, plus the funnel report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_pipeline.corpus.config import CleanConfig
from data_pipeline.corpus.warc import iter_warc, snapshot_from
from data_pipeline.executor import Task, run_local
from hibari.io import ensure_writable_dir, expand_inputs, write_jsonl
from hibari.errors import HibariError
from hibari.progress import progress_bar

_WARC_SUFFIXES = (".warc.gz", ".warc.zst", ".warc", ".arc.gz", ".arc", ".gz")
READ_STAGE = "read"


def output_stem(path: Path) -> str:
    name = path.name
    for suffix in _WARC_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def clean_shard(warc_path: str, out_path: str, cfg_data: dict, show_progress: bool = False) -> dict:
    """Clean one WARC file into `out_path` (written atomically). Returns the shard's counters.

    Never raises for bad data: damaged files, odd pages and even unexpected per-page errors are counted skips."""
    from data_pipeline.corpus.steps import build_steps, page_from_response

    cfg = CleanConfig.model_validate(cfg_data)
    path = Path(warc_path)
    steps = build_steps(cfg)
    read = {"records": 0, "huge_page": 0, "truncated_record": 0, "read_error": 0}
    internal_errors: dict[str, int] = {}
    t0 = time.perf_counter()
    state = {"snapshot": cfg.snapshot, "responses": 0}
    total_bytes = max(path.stat().st_size, 1) if path.exists() else 1
    max_block = cfg.read.max_page_bytes + 65536  # room for the HTTP header block

    def survivors(bar):
        for item in iter_warc(path, read, max_block, on_progress=lambda pos: bar.advance(pos - bar.done)):
            if isinstance(item, str):
                if state["snapshot"] is None:
                    state["snapshot"] = snapshot_from(item[len("warcinfo:"):], path.name)
                continue
            if state["snapshot"] is None:
                state["snapshot"] = snapshot_from("", path.name)
            state["responses"] += 1
            if show_progress and state["responses"] % 200 == 0:
                bar.set_postfix(f"{state['responses'] / (time.perf_counter() - t0):.0f} pages/s")
            page = page_from_response(item, state["snapshot"], path.name)
            try:
                for step in steps:
                    page = step(page)
                    if page is None:
                        break
            except Exception as err:  # noqa: BLE001 - one bad page must not crash the shard; counted
                key = f"{type(err).__name__}"
                internal_errors[key] = internal_errors.get(key, 0) + 1
                continue
            if page is not None:
                yield page.record()

    with progress_bar(total_bytes, f"clean {path.name}", unit="B", enabled=show_progress) as bar:
        written = write_jsonl(out_path, survivors(bar), level=cfg.zstd_level)
    read_stage = {"name": READ_STAGE, "pages_in": read["records"], "pages_out": state["responses"],
                  "chars_in": 0, "chars_out": 0,
                  "drops": {k: v for k, v in read.items() if k in ("huge_page", "truncated_record") and v}}
    stats = {
        "warc_file": path.name, "output": Path(out_path).name, "snapshot": state["snapshot"] or "unknown",
        "written": written, "elapsed_s": round(time.perf_counter() - t0, 3),
        "read_error": read.get("read_error", 0), "read_error_message": read.get("read_error_message", ""),
        "internal_errors": internal_errors,
        "stages": [read_stage] + [s.stats() for s in steps],
    }
    extra = getattr(steps[1], "categories_missing", None)
    if extra:
        stats["blocklist_categories_missing"] = extra
    return stats


def run_clean(input_glob, output_dir: str, cfg: CleanConfig, workers: int = 1, executor: str = "local",
              show_progress: bool = True, runner=None) -> dict:
    """Plan and run one task per input file (skipping completed ones), then write the funnel report.

    `runner` has `run_local`'s signature (e.g. `launch.slurm_array.make_runner(args)` for --executor slurm)."""
    if executor == "slurm" and runner is None:
        raise HibariError("executor='slurm' needs a runner: pass runner=launch.slurm_array.make_runner(args) "
                          "(the CLI does), or use executor='local'")
    if executor not in ("local", "slurm"):
        raise HibariError(f"--executor {executor!r}: expected local or slurm")
    if workers < 1:
        raise HibariError(f"--workers {workers}: expected a positive number")
    inputs = expand_inputs(input_glob)
    out = ensure_writable_dir(output_dir)
    stems: dict[str, Path] = {}
    for p in inputs:
        stem = output_stem(p)
        if stem in stems:
            raise HibariError(f"input {p}: same output name {stem}.jsonl.zst as {stems[stem]}; rename one of them")
        stems[stem] = p
    # validate the config (and its word/block lists) in the parent before any task starts
    from data_pipeline.corpus.steps import build_steps
    build_steps(cfg)
    cfg_data = cfg.model_dump(mode="json")
    state_dir = out / ".state"
    # temp files of a killed earlier run (atomic_write names them .<name>.tmp-<pid>); their shards rerun
    for stem in stems:
        for stale in out.glob(f".{stem}.jsonl.zst.tmp-*"):
            stale.unlink(missing_ok=True)
    tasks = [Task(task_id=stem, fn=clean_shard,
                  args=(str(p), str(out / f"{stem}.jsonl.zst"), cfg_data,
                        show_progress and workers == 1 and runner is None))
             for stem, p in stems.items()]
    t0 = time.perf_counter()
    results = (runner or run_local)(tasks, state_dir, workers=workers, desc="corpus clean",
                                    show_progress=show_progress)
    report = build_report(list(results.values()))
    report["wall_s_this_run"] = round(time.perf_counter() - t0, 3)
    write_report(report, out)
    return report


def build_report(shards: list[dict]) -> dict:
    """Sum the per-shard stage counters into the run's funnel."""
    stages: dict[str, dict] = {}
    order: list[str] = []
    extra_counters: dict[str, int] = {}
    internal: dict[str, int] = {}
    for shard in shards:
        for st in shard["stages"]:
            agg = stages.get(st["name"])
            if agg is None:
                agg = stages[st["name"]] = {"name": st["name"], "pages_in": 0, "pages_out": 0, "chars_in": 0,
                                            "chars_out": 0, "drops": {}}
                order.append(st["name"])
            for key in ("pages_in", "pages_out", "chars_in", "chars_out"):
                agg[key] += st[key]
            for reason, n in st["drops"].items():
                agg["drops"][reason] = agg["drops"].get(reason, 0) + n
            for key, value in st.items():
                if key not in agg and isinstance(value, int):
                    extra_counters[f"{st['name']}.{key}"] = extra_counters.get(f"{st['name']}.{key}", 0) + value
        for k, v in shard.get("internal_errors", {}).items():
            internal[k] = internal.get(k, 0) + v
    reasons: dict[str, int] = {}
    for name in order:
        for reason, n in stages[name]["drops"].items():
            reasons[f"{name}/{reason}"] = n
    elapsed = sum(s.get("elapsed_s", 0.0) for s in shards)
    records = stages[READ_STAGE]["pages_in"] if READ_STAGE in stages else 0
    return {
        "shards": len(shards),
        "documents_written": sum(s["written"] for s in shards),
        "pages_per_s_per_task": round(records / elapsed, 1) if elapsed > 0 else None,
        "read_errors": [{"warc_file": s["warc_file"], "message": s["read_error_message"]}
                        for s in shards if s.get("read_error")],
        "internal_errors": internal,
        "stages": [stages[n] for n in order],
        "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "counters": extra_counters,
        "per_shard": [{k: s[k] for k in ("warc_file", "output", "snapshot", "written", "elapsed_s")}
                      for s in shards],
    }


def write_report(report: dict, out: Path) -> None:
    from hibari.io import atomic_write

    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    lines = ["# corpus clean funnel", "",
             f"shards: {report['shards']}, documents written: {report['documents_written']}, "
             f"pages/s per task: {report['pages_per_s_per_task']}", "",
             "| stage | pages in | pages out | kept % | chars in | chars out |", "|---|---:|---:|---:|---:|---:|"]
    for st in report["stages"]:
        kept = f"{100 * st['pages_out'] / st['pages_in']:.1f}" if st["pages_in"] else "-"
        lines.append(f"| {st['name']} | {st['pages_in']:,} | {st['pages_out']:,} | {kept} | {st['chars_in']:,} | "
                     f"{st['chars_out']:,} |")
    lines += ["", "(chars: bytes before `decode`, HTML characters until `extract`, text characters after)", "",
              "## drop reasons", "", "| stage/reason | pages |", "|---|---:|"]
    lines += [f"| {r} | {n:,} |" for r, n in report["drop_reasons"].items()]
    if report["read_errors"]:
        lines += ["", "## read errors (file ended early; earlier records kept)", ""]
        lines += [f"- {e['warc_file']}: {e['message']}" for e in report["read_errors"]]
    if report["internal_errors"]:
        lines += ["", f"internal errors (pages skipped): {report['internal_errors']}"]
    with atomic_write(out / "report.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot_funnel(report, out / "funnel.png")


def _plot_funnel(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hibari.io import atomic_write

    stages = report["stages"]
    reasons = list(report["drop_reasons"].items())[:20]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [s["name"] for s in stages]
    axes[0].bar(names, [s["pages_out"] for s in stages], color="tab:blue")
    axes[0].set_title("pages surviving each stage")
    axes[0].tick_params(axis="x", rotation=45)
    if reasons:
        axes[1].barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1], color="tab:red")
    axes[1].set_title("drop reasons (pages)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))
