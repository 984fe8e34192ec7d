"""Near-duplicate removal at corpus scale (Swallow phase 3): MinHash-LSH across shards and snapshots, then hosts.

Pipeline (`run_dedup`, CLI `hibari corpus dedup`), every step resumable through executor markers:
    signatures  one task per shard: character n-gram MinHash (`minhash.MinHasher`), stored as per-band keys
    LSH         one task per band: equal keys grouped in key-range passes bounded by `memory_mb`
    clusters    union of all bands' edges -> connected components -> keep `newest` / `oldest` per cluster;
                per-host counts and the host-filter decision (`hosts.hosts_to_drop`)
    apply       one task per shard: deduplicated shard (same schema, same name) + removal list (id -> kept_id)
    report      report.json / report.md / cluster_sizes.png
Incremental: `run_dedup(new_input, out, previous=earlier_out)` reuses the stored signatures of earlier snapshots.
"""

from data_pipeline.dedup.minhash import MinHasher, char_ngram_jaccard, detection_probability, estimate_jaccard

__all__ = ["MinHasher", "char_ngram_jaccard", "detection_probability", "estimate_jaccard", "DedupConfig",
           "run_dedup"]


def __getattr__(name):  # keep `import data_pipeline.dedup` light (pydantic/executor only when the pipeline is used)
    if name in ("DedupConfig", "run_dedup"):
        from data_pipeline.dedup import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)
