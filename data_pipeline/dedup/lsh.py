"""LSH banding, connected components and keep policy: pure numpy functions over global document indices.

A document's global index is `shard offset + row` in the run's shard order. Band keys of one band are grouped by
equal value in key-range passes (so one pass holds only a 1/passes slice of the band in memory); every group of
size > 1 yields star edges (smallest index -> each other member). Components of the union of all bands' edges are
the duplicate clusters.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

# bytes of working memory per document in one pass of `band_edges` (keys, indices, argsort, sorted copies)
BYTES_PER_DOC_IN_PASS = 48


def passes_for_budget(num_docs: int, memory_bytes: int) -> int:
    """Number of key-range passes so one pass's working set fits in `memory_bytes`."""
    need = num_docs * BYTES_PER_DOC_IN_PASS
    return max(1, -(-need // max(memory_bytes, 1)))


def group_edges(keys: np.ndarray, gidx: np.ndarray) -> np.ndarray:
    """Star edges (M, 2) int64 between documents with equal keys; the first column is each group's smallest index."""
    if len(keys) < 2:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((gidx, keys))
    k = keys[order]
    g = gidx[order]
    same_as_prev = np.empty(len(k), dtype=bool)
    same_as_prev[0] = False
    np.not_equal(k[1:], k[:-1], out=same_as_prev[1:])
    np.logical_not(same_as_prev[1:], out=same_as_prev[1:])
    if not same_as_prev.any():
        return np.zeros((0, 2), np.int64)
    group_start = np.flatnonzero(~same_as_prev)
    # for each member, the position of its group's first member
    first_pos = group_start[np.searchsorted(group_start, np.arange(len(k)), side="right") - 1]
    members = np.flatnonzero(same_as_prev)
    return np.stack([g[first_pos[members]], g[members]], axis=1).astype(np.int64)


def band_edges(load_parts: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], num_docs: int,
               memory_bytes: int) -> tuple[np.ndarray, int]:
    """Edges of one band over all shards, with the working set bounded by `memory_bytes`.

    `load_parts()` yields (keys uint64, global indices int64) per shard; it is called once per pass and should
    read lazily (memory-mapped files), so only the keys of the pass's range are materialized.
    Returns (edges, passes).
    """
    passes = passes_for_budget(num_docs, memory_bytes)
    edges = []
    bounds = [(i << 32) // passes for i in range(passes + 1)]
    for p in range(passes):
        lo, hi = bounds[p], bounds[p + 1]
        keys_parts, idx_parts = [], []
        for keys, gidx in load_parts():
            if passes == 1:
                keys_parts.append(np.asarray(keys))
                idx_parts.append(np.asarray(gidx))
                continue
            top = np.asarray(keys) >> np.uint64(32)
            sel = (top >= lo) & (top < hi)
            keys_parts.append(np.asarray(keys)[sel])
            idx_parts.append(np.asarray(gidx)[sel])
        if not keys_parts:
            continue
        e = group_edges(np.concatenate(keys_parts), np.concatenate(idx_parts))
        del keys_parts, idx_parts
        if len(e):
            edges.append(e)
    return (np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)), passes


def connected_components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root) for every node touched by `edges`: root is the smallest node index of its component."""
    if len(edges) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(edges.ravel(), return_inverse=True)
    u, v = inv.reshape(-1, 2).T
    parent = np.arange(len(nodes), dtype=np.int64)
    while True:
        ru, rv = parent[u], parent[v]
        diff = ru != rv
        if not diff.any():
            break
        lo, hi = np.minimum(ru[diff], rv[diff]), np.maximum(ru[diff], rv[diff])
        np.minimum.at(parent, hi, lo)  # hook the larger root under the smaller one
        while True:  # pointer jumping until every node points at a root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return nodes, nodes[parent]


def choose_keepers(root: np.ndarray, date: np.ndarray, snapshot_rank: np.ndarray, tiebreak: np.ndarray,
                   policy: str) -> np.ndarray:
    """For each node, the position (into the node arrays) of its cluster's kept document.

    newest keeps the largest (date, snapshot, tiebreak), oldest the smallest (date, snapshot, -tiebreak): both
    orders are total and depend only on document metadata, never on shard order, so incremental and from-scratch
    runs pick the same document.
    """
    if policy not in ("newest", "oldest"):
        raise ValueError(f"keep policy {policy!r}: expected newest or oldest")
    n = len(root)
    if n == 0:
        return np.zeros(0, np.int64)
    if policy == "newest":
        order = np.lexsort((tiebreak, snapshot_rank, date, root))  # last of each root group = newest
    else:
        order = np.lexsort((~tiebreak, -snapshot_rank, -date, root))
    r = root[order]
    last_of_group = np.flatnonzero(np.r_[r[1:] != r[:-1], True])
    keeper_pos = order[last_of_group]
    group_of = np.searchsorted(r[last_of_group], root)
    return keeper_pos[group_of]


def cluster_size_histogram(root: np.ndarray) -> dict[int, int]:
    """{cluster size: number of clusters} over clusters of size >= 2."""
    if len(root) == 0:
        return {}
    _, sizes = np.unique(root, return_counts=True)
    vals, cnt = np.unique(sizes, return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, cnt)}
