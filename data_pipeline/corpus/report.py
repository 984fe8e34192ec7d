"""The funnel report of `hibari corpus clean`: report.json, report.md (with example URLs per drop reason),
funnel.png."""

from __future__ import annotations

from pathlib import Path

from hibari.io import atomic_write, write_json

READ_STAGE = "read"
EXAMPLES_PER_REASON = 3


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
    examples: dict[str, list[str]] = {}
    for shard in shards:
        for reason, urls in shard.get("examples", {}).items():
            have = examples.setdefault(reason, [])
            have.extend(u for u in urls if u not in have and len(have) < EXAMPLES_PER_REASON)
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
        "drop_examples": {r: examples[r] for r in sorted(reasons, key=lambda r: -reasons[r]) if r in examples},
        "records_read": sum(s.get("records_read", 0) for s in shards),
        "documents_dropped": sum(s.get("dropped", 0) for s in shards),
        "counters": extra_counters,
        "per_shard": [{k: s.get(k) for k in ("warc_file", "output", "ledger", "snapshot", "records_read", "written",
                                             "dropped", "elapsed_s")} for s in shards],
    }


def write_report(report: dict, out: Path) -> None:
    write_json(out / "report.json", report, indent=1)
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
    lines[-2:] = ["| stage/reason | pages | example URLs |", "|---|---:|---|"]
    lines += [f"| {r} | {n:,} | {' '.join(report['drop_examples'].get(r, []))} |"
              for r, n in report["drop_reasons"].items()]
    lines += ["", "Every dropped record (id, URL, stage, reason, measured value) is in `_ledger/`; "
                  "`hibari corpus explain OUTPUT --id ID | --url URL` prints one document's fate."]
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
