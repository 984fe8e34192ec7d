"""Benchmarks of the dedup stage (not run by `make test`).

  python bench/dedup.py signatures [--docs 2000] [--bands 40 --rows 20] [--baseline-python /tmp/bench-venv/bin/python]
      MinHash signature docs/s per core: hibari vs datasketch (MinHash.update_batch with permutations reused across
      documents, the strongest way to use it; and the common per-shingle `update`) vs datatrove's
      MinhashDedupSignature shingling + signature (its word tokenizer replaced by a character splitter so it hashes
      the same character n-grams). Same documents, same n-gram size, same bands x rows.
  python bench/dedup.py scurve [--families 2000] [--bands 40 --rows 20]
      Large-sample check of the hash family: detection rate per Jaccard bucket vs the S-curve (chi-square) and
      the z-scores of the Jaccard estimates (mean ~0, std ~1 for an unbiased binomial estimator).
  python bench/dedup.py lsh [--docs 1000000] [--memory-mb 128]
      LSH stage (band tasks + clusters) over synthetic band keys of N documents with planted duplicate clusters;
      time and peak RSS per stage, each in a fresh process.

Documents: real Japanese text (Aozora Bunko novels from ../shared/data cut into 1,500-character documents, plus
the 100 FineWeb-2 Japanese web documents); random kana/kanji text when ../shared is missing.
The baselines need datasketch and datatrove (datatrove's MinHash needs xxhash<4, the project uses xxhash 4):
    python3.11 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install datatrove==0.10.1 "xxhash<4" \
        datasketch numpy regex tokenizers
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): never import from the script's own folder
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def load_docs(num_docs: int, doc_chars: int = 1500) -> tuple[list[str], str]:
    docs: list[str] = []
    source = "synthetic"
    aozora = SHARED / "ja-plain-text" / "aozora"
    if aozora.is_dir():
        source = "aozora+fineweb2-ja"
        fw = SHARED / "ja-web-text" / "fineweb2-edu-japanese-100" / "fineweb_100_samples.json"
        if fw.is_file():
            rows = json.loads(fw.read_text(encoding="utf-8"))
            docs += [r["text"] for r in rows]
        for f in sorted(aozora.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("shift_jis", errors="replace")
            docs += [text[i:i + doc_chars] for i in range(0, len(text) - doc_chars, doc_chars)]
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    while len(docs) < num_docs:
        docs.append("".join(rng.choice(alphabet, doc_chars)))
    docs = docs[:num_docs]
    return docs, source


BASELINE_SCRIPT = r'''
import json, sys, time
import numpy as np
docs = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
n, bands, rows, which, reps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
K = bands * rows
def char_ngrams(t):
    return [t[i:i + n] for i in range(max(len(t) - n + 1, 1))]
def best_rate(fn, items):
    best = 0.0
    for _ in range(reps):  # CPU time: per-core throughput, robust to other jobs on the machine
        t0 = time.process_time()
        for t in items:
            fn(t)
        best = max(best, len(items) / (time.process_time() - t0))
    return best
out = {}
from importlib.metadata import version
if which == "datasketch":
    from datasketch import MinHash
    proto = MinHash(num_perm=K, seed=1)
    perms, scheme = proto.permutations, proto.scheme
    def batch(t):
        m = MinHash(num_perm=K, permutations=perms, scheme=scheme)
        m.update_batch([g.encode("utf-8") for g in char_ngrams(t)])
        return m.hashvalues
    def single(t):
        m = MinHash(num_perm=K, permutations=perms, scheme=scheme)
        for g in char_ngrams(t):
            m.update(g.encode("utf-8"))
        return m.hashvalues
    out["datasketch update_batch"] = best_rate(batch, docs)
    out["datasketch update (per shingle)"] = best_rate(single, docs[: max(len(docs) // 10, 20)])
    out["version"] = version("datasketch") + f" (scheme {scheme})"
else:
    import tempfile
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer
    class CharTokenizer(WordTokenizer):
        def word_tokenize(self, text): return list(text)
        def sent_tokenize(self, text): return [text]
        def span_tokenize(self, text): return [(0, len(text))]
    step = MinhashDedupSignature(tempfile.mkdtemp(), MinhashConfig(n_grams=n, num_buckets=bands,
                                 hashes_per_bucket=rows), language=CharTokenizer())
    step.parameters
    out["datatrove MinhashDedupSignature"] = best_rate(lambda t: step.get_signature(step.get_shingles(t)), docs)
    out["version"] = version("datatrove") + ", xxhash " + version("xxhash")
print(json.dumps(out))
'''


def bench_signatures(args) -> dict:
    from data_pipeline.dedup.minhash import MinHasher

    docs, source = load_docs(args.docs)
    chars = sum(len(d) for d in docs)
    hasher = MinHasher(ngram=args.ngram, bands=args.bands, rows=args.rows)
    hasher.signatures(docs[:50])  # warm-up
    best = 0.0
    for _ in range(3):  # CPU time of this process: per-core throughput, robust to other jobs on the machine
        t0 = time.process_time()
        for i in range(0, len(docs), 256):
            hasher.band_keys(hasher.signatures(docs[i:i + 256]))
        best = max(best, len(docs) / (time.process_time() - t0))
    results = {"hibari MinHasher (signatures + band keys)": best}
    versions = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        script = Path(tmp) / "baseline.py"
        script.write_text(BASELINE_SCRIPT)
        for which in ("datasketch", "datatrove"):
            proc = subprocess.run([args.baseline_python, str(script), str(path), str(args.ngram), str(args.bands),
                                   str(args.rows), which, str(args.repeats)], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
            if proc.returncode != 0:
                results[f"{which} (failed)"] = proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            versions[which] = res.pop("version")
            results.update(res)
    return {"docs": len(docs), "avg_chars": chars / len(docs), "source": source, "ngram": args.ngram,
            "bands": args.bands, "rows": args.rows, "docs_per_s": results, "versions": versions}


# ------------------------------------------------------------------------------------------------ LSH
def _write_synthetic_state(state: Path, num_docs: int, shards: int, bands: int, dup_fraction: float) -> list[dict]:
    """Band keys with planted clusters: `dup_fraction` of documents copy all band keys of an earlier document,
    and another 5% share one random band with one (a near-duplicate detected by a single band)."""
    from data_pipeline.dedup.stages import _save_npy, _save_npz, sig_paths

    rng = np.random.default_rng(0)
    per = -(-num_docs // shards)
    manifest = []
    offset = 0
    sig_dir = state / "sig"
    pool = None
    for s in range(shards):
        n = min(per, num_docs - offset)
        keys = rng.integers(0, 2**63, (bands, n), dtype=np.uint64)
        if pool is not None:
            dup = np.flatnonzero(rng.random(n) < dup_fraction)
            src = rng.integers(0, pool.shape[1], len(dup))
            keys[:, dup] = pool[:, src]
            near = np.flatnonzero(rng.random(n) < 0.05)
            band = rng.integers(0, bands, len(near))
            keys[band, near] = pool[band, rng.integers(0, pool.shape[1], len(near))]
        pool = keys[:, : min(n, 20000)].copy()
        key = f"shard-{s:05d}.jsonl.zst"
        bands_path, meta_path, _ = sig_paths(sig_dir, key)
        _save_npy(bands_path, keys)
        ids = np.char.add(f"s{s}-", np.arange(n).astype(str))
        _save_npz(meta_path, ids=ids, date=rng.integers(1.6e9, 1.7e9, n), snapshot=np.full(n, f"CC-MAIN-{s % 3}"),
                  host=np.char.add("h", (rng.integers(0, n // 20 + 1, n)).astype(str)), valid=np.ones(n, bool))
        manifest.append({"key": key, "input": "-", "sig_dir": str(sig_dir), "docs": n, "invalid": 0,
                         "offset": offset})
        offset += n
    return manifest


def _child_stage(argv) -> None:
    """Run one stage in this (fresh) process and print its time and peak RSS."""
    from data_pipeline.dedup import stages

    stage, state, bands, memory_mb = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    manifest = json.loads((state / "manifest.json").read_text())
    rss0 = _current_rss_mb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if stage == "band":
        (state / "edges").mkdir(exist_ok=True)
        stats = stages.band_task(int(argv[4]), manifest, str(state / "edges" / f"band-{int(argv[4]):03d}.i64"),
                                 memory_mb << 20)
    else:
        stats = stages.cluster_task(str(state), manifest, bands, "newest", 0.8, 10, "other_host")
        stats.pop("cluster_sizes")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "peak_rss_mb": peak, "rss_before_mb": rss0,
                      "peak_above_start_mb": peak - rss0, "stats": stats}))


def _current_rss_mb() -> float:
    """Resident set size now (ru_maxrss is a high-water mark that includes transient import peaks)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_child", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {argv[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_lsh(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        state = Path(tmp)
        t0 = time.perf_counter()
        manifest = _write_synthetic_state(state, args.docs, args.shards, args.bands, args.dup_fraction)
        (state / "manifest.json").write_text(json.dumps(manifest))
        setup_s = time.perf_counter() - t0
        band_runs = []
        for b in range(args.bands):
            band_runs.append(_run_child(["band", str(state), str(args.bands), str(args.memory_mb), str(b)]))
        cluster = _run_child(["cluster", str(state), str(args.bands), str(args.memory_mb)])
    return {"docs": args.docs, "shards": args.shards, "bands": args.bands, "memory_mb": args.memory_mb,
            "synthetic_setup_s": setup_s,
            "band_task_s_total": sum(r["seconds"] for r in band_runs),
            "band_task_cpu_s_total": sum(r["cpu_seconds"] for r in band_runs),
            "band_task_s_max": max(r["seconds"] for r in band_runs),
            "band_task_peak_rss_mb_max": max(r["peak_rss_mb"] for r in band_runs),
            "band_task_rss_at_start_mb": band_runs[0]["rss_before_mb"],
            "band_task_peak_above_start_mb_max": max(r["peak_above_start_mb"] for r in band_runs),
            "passes_per_band": band_runs[0]["stats"]["passes"],
            "edges_total": sum(r["stats"]["edges"] for r in band_runs),
            "cluster_task_s": cluster["seconds"], "cluster_task_cpu_s": cluster["cpu_seconds"],
            "cluster_task_peak_rss_mb": cluster["peak_rss_mb"],
            "cluster_task_peak_above_start_mb": cluster["peak_above_start_mb"],
            "cluster_stats": cluster["stats"]}


# ------------------------------------------------------------------------------------------------ S-curve
def bench_scurve(args) -> dict:
    """Large-sample check of the hash family: detection per Jaccard bucket vs 1-(1-s^r)^b (chi-square)."""
    from data_pipeline.dedup.minhash import MinHasher, char_ngram_jaccard, detection_probability, estimate_jaccard

    rng = np.random.default_rng(args.seed)
    kanji = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)] + [chr(c) for c in range(0x3041, 0x3097)]
    hasher = MinHasher(bands=args.bands, rows=args.rows)
    lo = max(0.0, (1 / args.bands) ** (1 / args.rows) - 0.25)  # the S-curve threshold minus a margin
    pj, det, est = [], [], []
    for _ in range(args.families):
        base = "".join(rng.choice(kanji, 400))
        variants = []
        for t in rng.uniform(lo, 1.0, 5):
            chars = list(base)
            for pos in rng.choice(400, max(1, round(400 * (1 - t) / (5 * (1 + t)))), replace=False):
                chars[pos] = kanji[rng.integers(len(kanji))]
            variants.append("".join(chars))
        sig = hasher.signatures([base, *variants])
        keys = hasher.band_keys(sig)
        for v, text in enumerate(variants, 1):
            pj.append(char_ngram_jaccard(base, text))
            det.append(bool((keys[:, v] == keys[:, 0]).any()))
            est.append(estimate_jaccard(sig[0], sig[v]))
    pj, det, est = np.array(pj), np.array(det), np.array(est)
    buckets, chi2, dof = [], 0.0, 0
    edges = np.linspace(lo, 1.0, 17)
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (pj >= a) & (pj < b)
        p = detection_probability(pj[sel], args.bands, args.rows)
        sd = float(np.sqrt((p * (1 - p)).sum()))
        z = (det[sel].sum() - p.sum()) / sd if sd > 0 else 0.0
        if sd > 0.5:
            chi2, dof = chi2 + z * z, dof + 1
        buckets.append({"jaccard": f"{a:.3f}-{b:.3f}", "pairs": int(sel.sum()), "detected": int(det[sel].sum()),
                        "expected": round(float(p.sum()), 1), "z": round(float(z), 2)})
    zest = (est - pj) / np.sqrt(pj * (1 - pj) / (args.bands * args.rows))
    return {"pairs": len(pj), "bands": args.bands, "rows": args.rows, "buckets": buckets,
            "chi2": round(chi2, 2), "dof": dof, "recall_at_jaccard_ge_0.9": float(det[pj >= 0.9].mean()),
            "estimate_z_mean": round(float(zest.mean()), 4), "estimate_z_std": round(float(zest.std()), 4)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child_stage(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("signatures")
    s.add_argument("--docs", type=int, default=2000)
    s.add_argument("--ngram", type=int, default=5)
    s.add_argument("--bands", type=int, default=40)
    s.add_argument("--rows", type=int, default=20)
    s.add_argument("--baseline-python", default="/tmp/bench-venv/bin/python")
    s.add_argument("--repeats", type=int, default=2, help="baseline passes (best is reported)")
    l = sub.add_parser("lsh")
    l.add_argument("--docs", type=int, default=1_000_000)
    l.add_argument("--shards", type=int, default=50)
    l.add_argument("--bands", type=int, default=40)
    l.add_argument("--memory-mb", type=int, default=128)
    l.add_argument("--dup-fraction", type=float, default=0.2)
    l.add_argument("--tmp", default=None)
    c = sub.add_parser("scurve")
    c.add_argument("--families", type=int, default=2000)
    c.add_argument("--bands", type=int, default=40)
    c.add_argument("--rows", type=int, default=20)
    c.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    result = {"signatures": bench_signatures, "lsh": bench_lsh, "scurve": bench_scurve}[args.what](args)
    result["machine"] = f"{os.cpu_count()}-core {platform.machine()} ({platform.processor() or 'cpu'}), " \
                        f"{time.strftime('%Y-%m-%d', time.gmtime())}"
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
