"""LSH banding, connected components and keep policy: pure numpy functions over global document indices.

A document's global index is `shard offset + row` in the run's shard order. Band keys of one band are grouped by
equal value in key-range passes (so one pass holds only a 1/passes slice of the band in memory); every group of
size > 1 yields star edges (smallest index -> each other member). Components of the union of all bands' edges are
the duplicate clusters.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

# bytes per document of one pass's working set (keys + indices, their sorted copies, run starts, edges); measured
# peak is ~34 B/doc (bench/dedup.py lsh), so this over-estimates on purpose
BYTES_PER_DOC_IN_PASS = 48
# kept free of the budget for what lives outside a pass: one shard's memory map and selection, file buffers
RESERVED_BYTES = 12 << 20


def passes_for_budget(num_docs: int, memory_bytes: int, reserved_bytes: int = RESERVED_BYTES) -> int:
    """Number of key-range passes so one pass's working set fits in `memory_bytes - reserved_bytes`
    (in half the budget when the budget is below twice the reserve)."""
    usable = memory_bytes - reserved_bytes if memory_bytes >= 2 * reserved_bytes else memory_bytes // 2
    usable = max(usable, 1)
    return max(1, -(-(num_docs * BYTES_PER_DOC_IN_PASS) // usable))


def _edges_from_sorted(k: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Star edges from keys `k` sorted ascending (ties ordered by ascending index `g`)."""
    if len(k) < 2:
        return np.zeros((0, 2), np.int64)
    same = np.empty(len(k), dtype=bool)  # same[i]: k[i] continues the group of k[i-1]
    same[0] = False
    np.equal(k[1:], k[:-1], out=same[1:])
    members = np.flatnonzero(same)
    if len(members) == 0:
        return np.zeros((0, 2), np.int64)
    # index of each member's group start: the last non-continuing position at or before it
    start_pos = np.where(same, 0, np.arange(len(k)))
    np.maximum.accumulate(start_pos, out=start_pos)
    return np.stack([g[start_pos[members]], g[members]], axis=1).astype(np.int64, copy=False)


def group_edges(keys: np.ndarray, gidx: np.ndarray) -> np.ndarray:
    """Star edges (M, 2) int64 between documents with equal keys; the first column is each group's smallest index."""
    order = np.lexsort((gidx, keys))
    return _edges_from_sorted(keys[order], gidx[order])


def band_edges(load_parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], num_docs: int,
               memory_bytes: int, reserved_bytes: int = RESERVED_BYTES) -> tuple[np.ndarray, int]:
    """All edges of one band in one array, and the number of passes (see `iter_band_edges`)."""
    passes = passes_for_budget(num_docs, memory_bytes, reserved_bytes)
    edges = list(iter_band_edges(load_parts, num_docs, memory_bytes, reserved_bytes))
    return (np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)), passes


def iter_band_edges(load_parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], num_docs: int,
                    memory_bytes: int, reserved_bytes: int = RESERVED_BYTES) -> Iterator[np.ndarray]:
    """Edges of one band over all shards, one array per key-range pass, the working set bounded by `memory_bytes`.

    `load_parts()` yields (keys uint64, global indices int64, ascending across and within parts) per shard; it is
    called once per pass and should read lazily (memory-mapped files), so only the keys of the pass's range are
    materialized. The caller should write each pass's edges out before asking for the next.
    """
    passes = passes_for_budget(num_docs, memory_bytes, reserved_bytes)
    bounds = [(i << 32) // passes for i in range(passes + 1)]
    for p in range(passes):
        lo, hi = np.uint64(bounds[p]), np.uint64(bounds[p + 1])
        keys_parts, idx_parts = [], []
        for keys, gidx in load_parts():
            if passes > 1:
                top = np.asarray(keys) >> np.uint64(32)
                sel = (top >= lo) & (top < hi)
                del top
                keys, gidx = np.asarray(keys)[sel], np.asarray(gidx)[sel]
            keys_parts.append(np.array(keys, dtype=np.uint64))  # a copy: frees the memory map of the shard
            idx_parts.append(np.asarray(gidx, dtype=np.int64))
        if not keys_parts:
            continue
        keys = np.concatenate(keys_parts)
        del keys_parts
        gidx = np.concatenate(idx_parts)
        del idx_parts
        order = np.argsort(keys, kind="stable")  # stable: equal keys stay in ascending index order
        keys = keys[order]
        gidx = gidx[order]
        del order
        e = _edges_from_sorted(keys, gidx)
        del keys, gidx
        if len(e):
            yield e


def connected_components(edges: np.ndarray | Iterable[np.ndarray], num_nodes: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root) for every node touched by `edges`: root is the smallest node index of its component.

    `edges` is one (M, 2) array or an iterable of them (e.g. one per band, loaded lazily): memory is one index
    per node (`num_nodes`, required for an iterable) plus one edge array at a time.
    """
    if isinstance(edges, np.ndarray):
        if num_nodes is None:
            num_nodes = int(edges.max()) + 1 if len(edges) else 0
        edges = [edges]
    elif num_nodes is None:
        raise ValueError("num_nodes is required when edges is an iterable")
    parent = np.arange(num_nodes, dtype=np.int64)
    is_touched = np.zeros(num_nodes, dtype=bool)  # nodes that appear in an edge; all roots of them are among them
    touched = np.zeros(0, np.int64)
    for e in edges:
        if len(e) == 0:
            continue
        u, v = np.ascontiguousarray(e[:, 0]), np.ascontiguousarray(e[:, 1])
        is_touched[u] = True
        is_touched[v] = True
        touched = np.flatnonzero(is_touched)
        while True:
            ru, rv = parent[u], parent[v]  # parent is fully compressed: parent[x] is x's root
            diff = ru != rv
            if not diff.any():
                break
            ru, rv = ru[diff], rv[diff]
            np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # hook the larger root under the smaller
            while True:  # pointer jumping over the touched nodes until each points at its root
                p = parent[touched]
                pp = parent[p]
                if np.array_equal(p, pp):
                    break
                parent[touched] = pp
    return touched, parent[touched]


def choose_keepers(root: np.ndarray, date: np.ndarray, snapshot_rank: np.ndarray, tiebreak: np.ndarray,
                   policy: str, eligible: np.ndarray | None = None) -> np.ndarray:
    """For each node, the position (into the node arrays) of its cluster's kept document.

    newest keeps the largest (date, snapshot, tiebreak), oldest the smallest (date, snapshot, -tiebreak): both
    orders are total and depend only on document metadata, never on shard order, so incremental and from-scratch
    runs pick the same document. With `eligible`, eligible members win over ineligible ones (used to avoid
    keeping a copy on a host the host filter drops).
    """
    if policy not in ("newest", "oldest"):
        raise ValueError(f"keep policy {policy!r}: expected newest or oldest")
    n = len(root)
    if n == 0:
        return np.zeros(0, np.int64)
    prefer = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    if policy == "newest":
        order = np.lexsort((tiebreak, snapshot_rank, date, prefer, root))  # last of each root group is kept
    else:
        order = np.lexsort((~tiebreak, -snapshot_rank, -date, prefer, root))
    r = root[order]
    last_of_group = np.flatnonzero(np.r_[r[1:] != r[:-1], True])
    keeper_pos = order[last_of_group]
    group_of = np.searchsorted(r[last_of_group], root)
    return keeper_pos[group_of]


def cluster_size_histogram(root: np.ndarray) -> dict[int, int]:
    """{cluster size: number of clusters} over clusters of size >= 2."""
    if len(root) == 0:
        return {}
    sizes = _run_lengths(np.sort(root))
    vals = np.sort(sizes)
    counts = _run_lengths(vals)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return {int(vals[s]): int(c) for s, c in zip(starts, counts)}


def _run_lengths(sorted_values: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in a sorted array (sort-based: numpy's hash unique is slow here)."""
    if len(sorted_values) == 0:
        return np.zeros(0, np.int64)
    breaks = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.diff(np.r_[0, breaks, len(sorted_values)])
