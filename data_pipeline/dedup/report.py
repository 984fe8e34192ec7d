"""Dedup report: report.json (machine-readable), report.md (for people), cluster_sizes.png (if matplotlib works)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hibari.io import atomic_write, read_jsonl


def write_report(dd: Path, config, shards: list[dict], sig_stats: list[dict], band_stats: list[dict],
                 cluster_stats: dict, apply_stats: list[dict], timings: dict, previous: str | None) -> dict:
    docs_in = sum(s["docs_in"] for s in apply_stats)
    snapshots_out: Counter = Counter()
    for s in apply_stats:
        snapshots_out.update(s["snapshots_out"])
    hosts_path = dd / "state" / "hosts.jsonl.zst"
    dropped_hosts = [h for h in read_jsonl(hosts_path) if h["dropped"]]
    dropped_hosts.sort(key=lambda h: (-h["pages"], h["host"]))
    sizes = {int(k): v for k, v in cluster_stats["cluster_sizes"].items()}
    report = {
        "params": config.model_dump(),
        "previous": previous,
        "shards": len(shards),
        "shards_new": len(sig_stats),
        "docs_in": docs_in,
        "invalid_passed_through": sum(s["invalid"] for s in shards),
        "dup_removed": sum(s["dup_removed"] for s in apply_stats),
        "host_removed": sum(s["host_removed"] for s in apply_stats),
        "docs_out": sum(s["docs_out"] for s in apply_stats),
        "clusters": cluster_stats["clusters"],
        "clustered_docs": cluster_stats["clustered_docs"],
        "cluster_size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
        "lsh_edges": sum(b["edges"] for b in band_stats),
        "lsh_passes_per_band": max((b["passes"] for b in band_stats), default=0),
        "hosts": cluster_stats["hosts"],
        "hosts_dropped": cluster_stats["hosts_dropped"],
        "docs_out_per_snapshot": dict(sorted(snapshots_out.items())),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    with atomic_write(dd / "report.json", "w") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    (dd / "hosts_dropped.txt").write_text("".join(h["host"] + "\n" for h in dropped_hosts), encoding="utf-8")
    png = _plot_histogram(sizes, dd / "cluster_sizes.png") if config.plot else False
    with atomic_write(dd / "report.md", "w") as f:
        f.write(_markdown(report, dropped_hosts[:20], png))
    return report


def _markdown(r: dict, top_dropped: list[dict], png: bool) -> str:
    p = r["params"]
    pct = (lambda n: f"{100 * n / r['docs_in']:.2f}%") if r["docs_in"] else (lambda n: "-")
    lines = [
        "# Near-duplicate removal report", "",
        f"MinHash over character {p['ngram']}-grams, {p['bands']} bands x {p['rows']} rows, keep {p['keep']}; "
        f"host filter: removed share ({p['host_count']}) > {p['host_threshold']} with >= {p['host_min_pages']} "
        f"pages{'' if p['host_filter'] else ' (disabled)'}.",
        "" if not r["previous"] else f"Incremental over the stored signatures of `{r['previous']}`.", "",
        "| | documents | share |", "|---|---:|---:|",
        f"| input | {r['docs_in']:,} | 100% |",
        f"| removed as near-duplicates | {r['dup_removed']:,} | {pct(r['dup_removed'])} |",
        f"| removed by host filter | {r['host_removed']:,} | {pct(r['host_removed'])} |",
        f"| output | {r['docs_out']:,} | {pct(r['docs_out'])} |",
        f"| invalid records passed through (no str id/text) | {r['invalid_passed_through']:,} | |", "",
        f"{r['clusters']:,} duplicate clusters hold {r['clustered_docs']:,} documents; "
        f"{r['hosts_dropped']:,} of {r['hosts']:,} hosts dropped.", "",
        "## Cluster sizes", "", "| size | clusters |", "|---:|---:|",
        *[f"| {k} | {v:,} |" for k, v in r["cluster_size_histogram"].items()], "",
    ]
    if png:
        lines += ["![cluster sizes](cluster_sizes.png)", ""]
    lines += ["## Output per snapshot", "", "| snapshot | documents |", "|---|---:|",
              *[f"| {k} | {v:,} |" for k, v in r["docs_out_per_snapshot"].items()], ""]
    if top_dropped:
        lines += ["## Largest dropped hosts", "", "| host | pages | near-dup removed | of them kept elsewhere |",
                  "|---|---:|---:|---:|",
                  *[f"| {h['host']} | {h['pages']:,} | {h['dup_removed']:,} | {h['dup_removed_other_host']:,} |"
                    for h in top_dropped], ""]
    lines += ["Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()), ""]
    return "\n".join(lines)


def _size_bins(sizes: dict[int, int], max_bars: int = 24) -> tuple[list[str], list[int]]:
    """Bars per cluster size, or per power-of-two size range when there are too many distinct sizes."""
    ks = sorted(sizes)
    if len(ks) <= max_bars:
        return [str(k) for k in ks], [sizes[k] for k in ks]
    bins: dict[int, int] = {}
    for k, v in sizes.items():
        upper = 1 << (k - 1).bit_length()  # 2, 4, 8, ...: range (upper/2, upper]
        bins[upper] = bins.get(upper, 0) + v
    labels = [str(u) if u == 2 else f"{u // 2 + 1}-{u}" for u in sorted(bins)]
    return labels, [bins[u] for u in sorted(bins)]


def _plot_histogram(sizes: dict[int, int], path: Path) -> bool:
    if not sizes:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the PNG is optional; the tables carry the same numbers
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, values = _size_bins(sizes)
    ax.bar(labels, values)
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_yscale("log")
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title("near-duplicate cluster sizes")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True
