"""Host filtering after near-dedup: drop hosts whose pages are mostly copies of pages kept elsewhere.

Swallow removes hosts by the share of their pages that dedup removed; the paper's threshold was not recoverable.
Our default: drop a host when more than 80% of its pages (and at least 10 pages) were removed as near-duplicates of
a page kept on ANOTHER host. Why these choices:
- counting only cross-host removals: across many snapshots a stable site is re-crawled every time and loses the
  older copies of its own pages; counting those would drop exactly the stable, often high-quality sites (with 21
  snapshots such a site loses ~95% of its pages to dedup). Copies of other hosts' pages are what marks mirrors,
  scrapers and content farms. `count="all"` counts every removal, as the paper's wording literally says.
- 0.8: a host where four in five pages are copies of pages found elsewhere is a mirror/aggregator; its remaining
  pages are most likely copies too, just edited below the MinHash threshold. Lower values start to hit news
  syndication partners and forum archives whose original share is substantial.
- at least 10 pages: a host with one or two pages, one of which is a copy, carries no evidence about the host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostCounts:
    pages: int = 0  # valid pages before dedup
    dup_removed: int = 0  # removed as near-duplicates (any kept host)
    dup_removed_other_host: int = 0  # removed as near-duplicates of a page kept on another host


def removed_share(counts: HostCounts, count: str) -> float:
    removed = counts.dup_removed if count == "all" else counts.dup_removed_other_host
    return removed / counts.pages if counts.pages else 0.0


def hosts_to_drop(per_host: dict[str, HostCounts], threshold: float, min_pages: int, count: str) -> list[str]:
    """Hosts with at least `min_pages` pages whose removed share is strictly above `threshold` (sorted)."""
    if count not in ("other_host", "all"):
        raise ValueError(f"host count mode {count!r}: expected other_host or all")
    return sorted(h for h, c in per_host.items()
                  if h and c.pages >= min_pages and removed_share(c, count) > threshold)
