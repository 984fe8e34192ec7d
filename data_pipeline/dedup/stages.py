"""Task functions of the dedup stage (one per shard or per band) and the on-disk state they share.

State layout under `OUTPUT/_dedup/state/` (every file written atomically; `done/` holds executor markers):
    run.json                    inputs (size, mtime), parameters, --previous run of this output (reruns must match)
    shards.json                 manifest: key, input path, signature dir, docs, offset (global index base)
    sig/<key>.bands.npy         (bands, docs) uint64 band keys            -- written by `signature_task`
    sig/<key>.meta.npz          ids, date (epoch s), snapshot, host, valid -- written by `signature_task`
    sig/<key>.minhash.npy       (docs, bands*rows) uint32, only with save_minhash
    edges/band-XXX.i64          raw int64 pairs: star edges of band XXX     -- written by `band_task`
    clusters/<key>.npz          removed rows + kept id per removed row      -- written by `cluster_task`
    hosts.jsonl.zst, hosts_dropped.json                                    -- written by `cluster_task`
Incremental runs reference earlier outputs' `sig/` files through the manifest instead of copying them.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import xxhash

from data_pipeline.dedup.hosts import HostCounts, hosts_to_drop, removed_share
from data_pipeline.dedup.lsh import (choose_keepers, cluster_size_histogram, connected_components, iter_band_edges,
                                     passes_for_budget)
from data_pipeline.dedup.minhash import MinHasher
from data_pipeline.readers import as_source, iter_records
from hibari.io import atomic_write, write_jsonl

SIGNATURE_COLUMNS = ["id", "text", "date", "snapshot", "host", "url"]  # what signature_task reads of a record
from hibari.errors import HibariError

MISSING_DATE = -(2**62)  # documents without a parsable WARC date sort as the oldest


def parse_date(value) -> int:
    """ISO-8601 WARC date -> epoch seconds (UTC if no zone); MISSING_DATE when empty or invalid."""
    if not isinstance(value, str) or not value:
        return MISSING_DATE
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return MISSING_DATE
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def record_host(rec: dict) -> str:
    host = rec.get("host")
    if isinstance(host, str) and host:
        return host.lower()
    url = rec.get("url")
    if isinstance(url, str):
        try:
            return (urlsplit(url).hostname or "").lower()
        except ValueError:
            return ""
    return ""


def id_tiebreak(ids) -> np.ndarray:
    """Order-independent tie-breaker between documents with equal date and snapshot."""
    return np.fromiter((xxhash.xxh64_intdigest(i.encode("utf-8")) for i in ids), dtype=np.uint64, count=len(ids))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def sig_paths(sig_dir: str | Path, key: str) -> tuple[Path, Path, Path]:
    base = Path(sig_dir) / key
    return (base.with_name(base.name + ".bands.npy"), base.with_name(base.name + ".meta.npz"),
            base.with_name(base.name + ".minhash.npy"))


# --------------------------------------------------------------------------------------------- signatures
def signature_task(input_path, key: str, sig_dir: str, ngram: int, bands: int, rows: int, seed: int,
                   batch_docs: int = 256, save_minhash: bool = False) -> dict:
    """MinHash band keys + metadata of one shard. Records without a str `id` and `text` are kept as they are,
    never deduplicated, and counted as `invalid`."""
    hasher = MinHasher(ngram=ngram, bands=bands, rows=rows, seed=seed)
    ids, dates, snapshots, hosts, valid = [], [], [], [], []
    key_parts, sig_parts = [], []
    batch: list[str] = []
    chars = 0

    def flush():
        if batch:
            sig = hasher.signatures(batch)
            key_parts.append(hasher.band_keys(sig))
            if save_minhash:
                sig_parts.append(sig)
            batch.clear()

    for rec in iter_records(input_path, columns=SIGNATURE_COLUMNS):
        text, doc_id = rec.get("text"), rec.get("id")
        ok = isinstance(text, str) and isinstance(doc_id, str)
        valid.append(ok)
        ids.append(doc_id if isinstance(doc_id, str) else "")
        dates.append(parse_date(rec.get("date")))
        snap = rec.get("snapshot")
        snapshots.append(snap if isinstance(snap, str) else "")
        hosts.append(record_host(rec))
        batch.append(text if ok else "")  # invalid rows get a placeholder signature and are masked out of LSH
        chars += len(text) if ok else 0
        if len(batch) >= batch_docs:
            flush()
    flush()
    n = len(ids)
    keys = np.concatenate(key_parts, axis=1) if key_parts else np.zeros((bands, 0), np.uint64)
    bands_path, meta_path, minhash_path = sig_paths(sig_dir, key)
    _save_npy(bands_path, keys)
    if save_minhash:
        _save_npy(minhash_path, np.concatenate(sig_parts) if sig_parts else np.zeros((0, bands * rows), np.uint32))
    _save_npz(meta_path, ids=np.array(ids, dtype=str), date=np.array(dates, dtype=np.int64),
              snapshot=np.array(snapshots, dtype=str), host=np.array(hosts, dtype=str),
              valid=np.array(valid, dtype=bool))
    return {"docs": n, "invalid": n - int(sum(valid)), "chars": chars}


# --------------------------------------------------------------------------------------------- LSH per band
def band_task(band: int, shards: list[dict], edges_path: str, memory_bytes: int) -> dict:
    """Star edges between documents sharing band `band`'s key, over all shards, in bounded memory."""
    total = sum(s["docs"] for s in shards)

    def load_parts():
        for s in shards:
            if s["docs"] == 0:
                continue
            bands_path, meta_path, _ = sig_paths(s["sig_dir"], s["key"])
            keys = np.load(bands_path, mmap_mode="r")[band]
            with np.load(meta_path) as meta:
                valid = meta["valid"]
            gidx = s["offset"] + np.flatnonzero(valid)
            yield (keys[valid] if not valid.all() else keys), gidx

    count = 0
    with atomic_write(edges_path, "wb") as f:  # each pass's edges go to disk before the next pass starts
        for edges in iter_band_edges(load_parts, total, memory_bytes):
            edges.astype("<i8", copy=False).tofile(f)
            count += len(edges)
    return {"band": band, "edges": count, "passes": passes_for_budget(total, memory_bytes)}


def load_edges(path: str | Path) -> np.ndarray:
    return np.fromfile(path, dtype="<i8").reshape(-1, 2)


# --------------------------------------------------------------------------------------------- clusters + hosts
def cluster_task(state_dir: str, shards: list[dict], bands: int, keep: str, host_threshold: float,
                 host_min_pages: int, host_count: str) -> dict:
    """Union the bands' edges into clusters, pick the kept document per cluster, decide the hosts to drop."""
    state = Path(state_dir)
    num_docs = sum(s["docs"] for s in shards)
    nodes, root = connected_components((load_edges(state / "edges" / f"band-{b:03d}.i64") for b in range(bands)),
                                       num_docs)
    offsets = np.array([s["offset"] for s in shards], dtype=np.int64)
    shard_of = np.searchsorted(offsets, nodes, side="right") - 1 if len(nodes) else np.zeros(0, np.int64)

    # metadata of clustered documents, gathered shard by shard
    node_ids = np.empty(len(nodes), dtype=object)
    node_date = np.zeros(len(nodes), np.int64)
    node_snap = np.empty(len(nodes), dtype=object)
    node_host = np.empty(len(nodes), dtype=object)
    for si in np.flatnonzero(np.bincount(shard_of, minlength=len(shards))):
        s = shards[si]
        sel = np.flatnonzero(shard_of == si)
        rows = nodes[sel] - s["offset"]
        with np.load(sig_paths(s["sig_dir"], s["key"])[1]) as meta:
            node_ids[sel] = meta["ids"][rows]
            node_date[sel] = meta["date"][rows]
            node_snap[sel] = meta["snapshot"][rows]
            node_host[sel] = meta["host"][rows]
    snap_names = sorted(set(node_snap.tolist()))
    snap_rank = np.searchsorted(np.array(snap_names, dtype=str), np.array(node_snap.tolist(), dtype=str)) \
        .astype(np.int64) if len(nodes) else np.zeros(0, np.int64)
    tiebreak = id_tiebreak(node_ids.tolist())
    keeper = choose_keepers(root, node_date, snap_rank, tiebreak, keep)
    removed = keeper != np.arange(len(nodes))
    histogram = cluster_size_histogram(root)

    # host filter, decided on the dedup result
    pages: Counter = Counter()
    for s in shards:
        with np.load(sig_paths(s["sig_dir"], s["key"])[1]) as meta:
            pages.update(meta["host"][meta["valid"]].tolist())
    dup_removed = Counter(node_host[removed].tolist())
    other = removed & (node_host != node_host[keeper])
    dup_removed_other = Counter(node_host[other].tolist())
    counts = {h: HostCounts(c, dup_removed[h], dup_removed_other[h]) for h, c in pages.items()}
    dropped = hosts_to_drop(counts, host_threshold, host_min_pages, host_count)
    dropped_set = set(dropped)
    if dropped_set and len(nodes):
        # a cluster whose kept copy sits on a dropped host keeps its best copy on a remaining host instead,
        # so the text survives whenever any copy can
        eligible = np.fromiter((h not in dropped_set for h in node_host), dtype=bool, count=len(nodes))
        keeper = choose_keepers(root, node_date, snap_rank, tiebreak, keep, eligible=eligible)
        removed = keeper != np.arange(len(nodes))
    final_dup_removed = Counter(node_host[removed].tolist())

    # per-shard decisions
    for si, s in enumerate(shards):
        sel = np.flatnonzero((shard_of == si) & removed)
        rows = nodes[sel] - s["offset"]
        _save_npz(state / "clusters" / (s["key"] + ".npz"), removed_rows=rows.astype(np.int64),
                  kept_ids=np.array(node_ids[keeper[sel]].tolist(), dtype=str))
    with atomic_write(state / "hosts_dropped.json", "w") as f:
        json.dump(dropped, f, ensure_ascii=False)
    write_jsonl(state / "hosts.jsonl.zst", (
        {"host": h, "pages": c.pages, "after_dedup": c.pages - c.dup_removed,
         "after_host_filter": 0 if h in dropped_set else c.pages - final_dup_removed[h],
         "dup_removed": c.dup_removed, "dup_removed_other_host": c.dup_removed_other_host,
         "removed_share": round(removed_share(c, host_count), 6), "dropped": h in dropped_set}
        for h, c in sorted(counts.items(), key=lambda kv: (-kv[1].pages, kv[0]))))
    return {"clustered_docs": int(len(nodes)), "clusters": int(sum(histogram.values())),
            "dup_removed": int(removed.sum()), "cluster_sizes": {str(k): v for k, v in histogram.items()},
            "hosts": len(counts), "hosts_dropped": len(dropped)}


# --------------------------------------------------------------------------------------------- apply
def apply_task(input_path, key: str, docs: int, clusters_path: str, hosts_dropped_path: str, out_path: str,
               removed_path: str) -> dict:
    """Write the shard without removed documents (same schema, same order) and its removal list."""
    with np.load(clusters_path) as dec:
        kept_of = dict(zip(dec["removed_rows"].tolist(), dec["kept_ids"].tolist()))
    dropped = set(json.loads(Path(hosts_dropped_path).read_text(encoding="utf-8")))
    removals: list[dict] = []
    stats = Counter()
    snapshots_out: Counter = Counter()

    def kept_records():
        row = -1
        for row, rec in enumerate(iter_records(input_path)):
            host = record_host(rec)
            common = {"id": rec.get("id"), "host": host, "snapshot": rec.get("snapshot"), "url": rec.get("url")}
            if row in kept_of:
                removals.append({**common, "reason": "near_duplicate", "kept_id": kept_of[row]})
                stats["dup_removed"] += 1
            elif host in dropped and isinstance(rec.get("text"), str) and isinstance(rec.get("id"), str):
                removals.append({**common, "reason": "host_filter", "kept_id": None})
                stats["host_removed"] += 1
            else:
                stats["docs_out"] += 1
                snapshots_out[str(rec.get("snapshot"))] += 1
                yield rec
        if row + 1 != docs:
            raise HibariError(f"{as_source(input_path).label}: has {row + 1} records but {docs} when its signatures were computed "
                              f"(input changed; use a fresh --output)")

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_path, kept_records())
    Path(removed_path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(removed_path, removals)
    return {"docs_in": docs, "dup_removed": stats["dup_removed"], "host_removed": stats["host_removed"],
            "docs_out": stats["docs_out"], "snapshots_out": dict(snapshots_out)}
