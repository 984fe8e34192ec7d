"""Task functions of the dedup stage (one per shard or per band) and the on-disk state they share.

State layout under `OUTPUT/_dedup/state/` (every file written atomically; `done/` holds executor markers):
    params.json                 MinHash/LSH/keep/host parameters of this output (reruns must match)
    shards.json                 manifest: key, input path, signature dir, docs, offset (global index base)
    sig/<key>.bands.npy         (bands, docs) uint64 band keys            -- written by `signature_task`
    sig/<key>.meta.npz          ids, date (epoch s), snapshot, host, valid -- written by `signature_task`
    sig/<key>.minhash.npy       (docs, bands*rows) uint32, only with save_minhash
    edges/band-XX.npy           (M, 2) int64 star edges of band XX         -- written by `band_task`
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
from data_pipeline.dedup.lsh import band_edges, choose_keepers, cluster_size_histogram, connected_components
from data_pipeline.dedup.minhash import MinHasher
from data_pipeline.io import atomic_write, read_jsonl, write_jsonl
from launch.errors import HibariError

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
def signature_task(input_path: str, key: str, sig_dir: str, ngram: int, bands: int, rows: int, seed: int,
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

    for rec in read_jsonl(input_path):
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

    edges, passes = band_edges(load_parts, total, memory_bytes)
    _save_npy(Path(edges_path), edges)
    return {"band": band, "edges": int(len(edges)), "passes": passes}


# --------------------------------------------------------------------------------------------- clusters + hosts
def cluster_task(state_dir: str, shards: list[dict], bands: int, keep: str, host_threshold: float,
                 host_min_pages: int, host_count: str) -> dict:
    """Union the bands' edges into clusters, pick the kept document per cluster, decide the hosts to drop."""
    state = Path(state_dir)
    parts = [np.load(state / "edges" / f"band-{b:03d}.npy") for b in range(bands)]
    edges = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    del parts
    if len(edges):
        edges = np.unique(edges, axis=0)
    nodes, root = connected_components(edges)
    del edges
    offsets = np.array([s["offset"] for s in shards], dtype=np.int64)
    shard_of = np.searchsorted(offsets, nodes, side="right") - 1 if len(nodes) else np.zeros(0, np.int64)

    # metadata of clustered documents, gathered shard by shard
    node_ids = np.empty(len(nodes), dtype=object)
    node_date = np.zeros(len(nodes), np.int64)
    node_snap = np.empty(len(nodes), dtype=object)
    node_host = np.empty(len(nodes), dtype=object)
    for si in np.unique(shard_of):
        s = shards[si]
        sel = np.flatnonzero(shard_of == si)
        rows = nodes[sel] - s["offset"]
        with np.load(sig_paths(s["sig_dir"], s["key"])[1]) as meta:
            node_ids[sel] = meta["ids"][rows]
            node_date[sel] = meta["date"][rows]
            node_snap[sel] = meta["snapshot"][rows]
            node_host[sel] = meta["host"][rows]
    snap_names = sorted(set(node_snap.tolist()))
    snap_rank = np.searchsorted(np.array(snap_names, dtype=object), node_snap).astype(np.int64) if len(nodes) \
        else np.zeros(0, np.int64)
    keeper = choose_keepers(root, node_date, snap_rank, id_tiebreak(node_ids.tolist()), keep)
    removed = keeper != np.arange(len(nodes))
    histogram = cluster_size_histogram(root)

    # per-shard decisions and per-host counts
    per_host: dict[str, list[int]] = {}
    for si, s in enumerate(shards):
        sel = np.flatnonzero((shard_of == si) & removed)
        rows = nodes[sel] - s["offset"]
        kept_pos = keeper[sel]
        _save_npz(state / "clusters" / (s["key"] + ".npz"), removed_rows=rows.astype(np.int64),
                  kept_ids=np.array(node_ids[kept_pos].tolist(), dtype=str))
        with np.load(sig_paths(s["sig_dir"], s["key"])[1]) as meta:
            hosts, valid = meta["host"], meta["valid"]
        for h, c in Counter(hosts[valid].tolist()).items():
            per_host.setdefault(h, [0, 0, 0])[0] += c
        removed_hosts = node_host[sel]
        other = removed_hosts != node_host[kept_pos]
        for h, c in Counter(removed_hosts.tolist()).items():
            per_host[h][1] += c
        for h, c in Counter(removed_hosts[other].tolist()).items():
            per_host[h][2] += c
    counts = {h: HostCounts(*v) for h, v in per_host.items()}
    dropped = hosts_to_drop(counts, host_threshold, host_min_pages, host_count)
    dropped_set = set(dropped)
    with atomic_write(state / "hosts_dropped.json", "w") as f:
        json.dump(dropped, f, ensure_ascii=False)
    write_jsonl(state / "hosts.jsonl.zst", (
        {"host": h, "pages": c.pages, "after_dedup": c.pages - c.dup_removed,
         "after_host_filter": 0 if h in dropped_set else c.pages - c.dup_removed,
         "dup_removed": c.dup_removed, "dup_removed_other_host": c.dup_removed_other_host,
         "removed_share": round(removed_share(c, host_count), 6), "dropped": h in dropped_set}
        for h, c in sorted(counts.items(), key=lambda kv: (-kv[1].pages, kv[0]))))
    return {"clustered_docs": int(len(nodes)), "clusters": int(sum(histogram.values())),
            "dup_removed": int(removed.sum()), "cluster_sizes": {str(k): v for k, v in histogram.items()},
            "hosts": len(counts), "hosts_dropped": len(dropped),
            "host_filter_pages": int(sum(counts[h].pages - counts[h].dup_removed for h in dropped))}


# --------------------------------------------------------------------------------------------- apply
def apply_task(input_path: str, key: str, docs: int, clusters_path: str, hosts_dropped_path: str, out_path: str,
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
        for row, rec in enumerate(read_jsonl(input_path)):
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
            raise HibariError(f"{input_path}: has {row + 1} records but {docs} when its signatures were computed "
                              f"(input changed; use a fresh --output)")

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_path, kept_records())
    Path(removed_path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(removed_path, removals)
    return {"docs_in": docs, "dup_removed": stats["dup_removed"], "host_removed": stats["host_removed"],
            "docs_out": stats["docs_out"], "snapshots_out": dict(snapshots_out)}
