"""Benchmark `hibari data tokenize` and the training-index build.

1. Tokens/s per core of `hibari data tokenize` (one worker: JSONL.zst read + SentencePiece + .bin/.idx write +
   merge) vs the raw SentencePiece encoder on the same documents held in memory, in the same run.
   Goal: writer overhead <= 10%.
All times are CPU seconds of this process (single-threaded work), so a busy shared machine does not distort the
ratio much. 2. Index build for a synthetic 1e9-token dataset (seq 4096): hibari's numpy GPTSampleDataset build and a 90/10 blend,
   vs Megatron-core's own path (its compiled helpers_cpp sample index + numpy RandomState shuffles), when
   megatron-core is installed.

Usage: python -m bench.tokenize_speed [--mb 20] [--tokens 1e9] [--out bench/results/tokenize.md]
Texts: the shared Japanese web samples (../shared/data) when present, else synthetic Japanese text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"

# CPU seconds of this process, not wall time: the CI machine is shared with other jobs, and CPU time is what
# "per core" means. Everything measured here runs single-threaded in this process.
_clock = time.process_time


def load_texts() -> tuple[list[str], str]:
    texts = []
    for rel in ("ja-web-text/fineweb2-edu-japanese-100/fineweb_100_samples.jsonl",
                "mc4-ja-quality-labeled/mc4_ja_labeled_original.jsonl"):
        p = SHARED / rel
        if p.is_file():
            for line in p.read_text(encoding="utf-8").split("\n"):
                if not line.strip():
                    continue
                t = json.loads(line).get("text")
                if isinstance(t, str) and t.strip():
                    texts.append(t)
    if texts:
        return texts, "shared Japanese web samples (fineweb2-edu-japanese-100 + mc4-ja)"
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 800)] + ["。", "、"]
    return ["".join(rng.choice(chars) for _ in range(rng.randint(200, 1500))) for _ in range(300)], "synthetic"


def bench_tokenize(mb: float, tmp: Path, threads: int) -> dict:
    import sentencepiece as spm

    from data_pipeline.indexed.tokenize import tokenize_corpus
    from hibari.io import write_jsonl
    from data_pipeline.tokenizer.spm import train_tokenizer

    texts, source = load_texts()
    write_jsonl(tmp / "train.jsonl", ({"text": t} for t in texts))
    # trained in a child process, as in real use (`data tokenize` never trains): SentencePiece's trainer leaves this
    # process's heap in a state that made the batched encoder ~8% slower afterwards in every later round
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=train_tokenizer, args=([str(tmp / "train.jsonl")], 8000, tmp / "tok"),
        kwargs=dict(threads=threads, show_progress=False))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"tokenizer training failed (exit code {child.exitcode})")
    # replicate the documents up to ~mb of UTF-8 text
    corpus, size = [], 0
    while size < mb * 1e6:
        for t in texts:
            corpus.append(t.encode("utf-8").decode("utf-8"))  # distinct objects, as documents read from a shard
            size += len(t.encode("utf-8"))
    write_jsonl(tmp / "corpus.jsonl.zst", ({"text": t} for t in corpus))
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "tok" / "tokenizer.model"))
    from hibari.io import read_jsonl

    from data_pipeline.tokenizer.encoder import load_encoder

    batch_encode = load_encoder(tmp / "tok").encode_batch  # what `data tokenize` calls, ~1M characters at a time
    corpus_utf8 = [t.encode("utf-8") for t in corpus]
    bounds, chars = [0], 0  # batches of ~1M characters, as `data tokenize` makes them
    for i, t in enumerate(corpus, 1):
        chars += len(t)
        if chars >= 1 << 20 or i == len(corpus):
            bounds.append(i)
            chars = 0
    times: dict[str, list[float]] = {k: [] for k in ("raw", "batch", "jsonl", "read", "hibari")}
    counts: dict[str, int] = {}
    shard = str(tmp / "corpus.jsonl.zst")

    def run_raw(rep):
        # fresh str objects each round, as documents read from a shard: a str passed to SentencePiece once keeps
        # its UTF-8 form cached, which would make later rounds of the in-memory loops ~5% cheaper than real input
        corpus = [b.decode("utf-8") for b in corpus_utf8]
        t0 = _clock()
        n = sum(len(sp.encode(t)) for t in corpus)
        return _clock() - t0, n

    def run_batch(rep):
        corpus = [b.decode("utf-8") for b in corpus_utf8]
        batches = [corpus[a:b] for a, b in zip(bounds, bounds[1:])]
        t0 = _clock()
        n = sum(len(ids) for b in batches for ids in batch_encode(b))
        return _clock() - t0, n

    def run_jsonl(rep):
        t0 = _clock()
        with open(shard, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as zr:
            n = sum(len(sp.encode(json.loads(line)["text"])) for line in io.TextIOWrapper(zr, "utf-8"))
        return _clock() - t0, n

    def run_read(rep):
        t0 = _clock()
        n = sum(len(sp.encode(r["text"])) for r in read_jsonl(shard))
        return _clock() - t0, n

    def run_hibari(rep):
        t0 = _clock()
        s = tokenize_corpus([shard], str(tmp / "tok"), str(tmp / f"out{rep}"), workers=1, add_bos=False,
                            show_progress=False)
        return _clock() - t0, s["tokens"]

    runs = [("raw", run_raw), ("batch", run_batch), ("jsonl", run_jsonl), ("read", run_read),
            ("hibari", run_hibari)]
    for rep in range(7):  # interleaved, best of 7: the CI machine is shared, so single runs are noisy
        # the order rotates each round: a path always run first (fresh caches, full clock boost) is favoured
        for name, fn in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            seconds, counts[name] = fn(rep)
            times[name].append(seconds)
        assert len(set(counts.values())) == 1, counts
    n_tokens = counts["raw"]
    raw_times, batch_times, read_times, hib_times, jsonl_times = (times[k] for k in ("raw", "batch", "read",
                                                                                      "hibari", "jsonl"))
    raw, rd, hib, bat = min(raw_times), min(read_times), min(hib_times), min(batch_times)
    jsl = min(jsonl_times)
    return {"source": source, "documents": len(corpus), "mb_text": round(size / 1e6, 1), "tokens": n_tokens,
            "raw_tokens_per_s": n_tokens / raw, "batch_tokens_per_s": n_tokens / bat, "batch_s": bat, "read_tokens_per_s": n_tokens / rd,
            "hibari_tokens_per_s": n_tokens / hib, "overhead_pct": 100 * (hib - raw) / raw,
            "writer_overhead_pct": 100 * (hib - rd) / rd, "raw_s": raw, "read_s": rd, "hibari_s": hib,
            "jsonl_s": jsl, "jsonl_tokens_per_s": n_tokens / jsl}


def _synthetic_dataset(prefix: Path, total_tokens: int, seed: int) -> int:
    """.idx with realistic document lengths and a sparse .bin of the right size (index build never reads tokens)."""
    from megatron_ext.data.indexed_dataset import write_index

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(6.5, 1.0, size=int(total_tokens / 900 * 1.2)), 16, 60000).astype(np.int64)
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, total_tokens)) + 1
    lengths = lengths[:n].astype(np.int32)
    write_index(f"{prefix}.idx", np.uint16, lengths, np.arange(n + 1, dtype=np.int64))
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    return n


def _megatron_baseline(lengths: np.ndarray, seq: int, num_samples: int, seed: int) -> float | None:
    """Megatron-core's GPTDataset index path: numpy RandomState doc shuffle, C++ sample index, numpy shuffle."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.helpers import build_sample_idx
    except ImportError:
        return None
    t0 = _clock()
    tpe = int(lengths.sum(dtype=np.int64))
    epochs = max(1, -(-(num_samples * seq + 1) // tpe))
    rs = np.random.RandomState(seed)
    doc_idx = np.mgrid[0:epochs, 0:len(lengths)][1].reshape(-1).astype(np.int32)
    rs.shuffle(doc_idx)
    sample_idx = build_sample_idx(lengths, doc_idx, seq, epochs, tpe, True, True)
    shuffle = np.arange(sample_idx.shape[0] - 1, dtype=np.uint32)
    rs.shuffle(shuffle)
    return _clock() - t0


def _megatron_blend(weights: np.ndarray, n: int) -> float | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
    except ImportError:
        return None
    a, b = np.zeros(n, np.int16), np.zeros(n, np.int64)
    t0 = _clock()
    helpers_cpp.build_blending_indices(a, b, weights, len(weights), n, False)
    return _clock() - t0


def bench_index(total_tokens: int, tmp: Path) -> dict:
    from megatron_ext.data import IndexedDataset, build_indexed_datasets
    from megatron_ext.data.blended import build_blending_indices
    from megatron_ext.data.gpt_dataset import GPTSampleDataset

    seq = 4096
    n_docs = _synthetic_dataset(tmp / "big", total_tokens, 0)
    ds = IndexedDataset(tmp / "big")
    out = {"tokens": ds.num_tokens, "documents": n_docs, "seq_length": seq}
    for epochs in (1, 3):
        num_samples = int(epochs * (ds.num_tokens - 1) // seq) - 1
        t0 = _clock()
        g = GPTSampleDataset(ds, 0, n_docs, seq, num_samples, seed=1234, cache_dir=tmp / f"cache{epochs}")
        out[f"hibari_build_{epochs}ep_s"] = _clock() - t0
        t0 = _clock()
        GPTSampleDataset(ds, 0, n_docs, seq, num_samples, seed=1234, cache_dir=tmp / f"cache{epochs}")
        out[f"hibari_cached_{epochs}ep_s"] = _clock() - t0
        out[f"megatron_build_{epochs}ep_s"] = _megatron_baseline(np.asarray(ds.sequence_lengths), seq, num_samples,
                                                                 1234)
        _ = g[len(g) - 1]
    # Swallow-like 90/10 blend over two 1e9-token sets (second copy with another seed), 1 epoch of samples
    _synthetic_dataset(tmp / "big_en", total_tokens // 9, 1)
    n_train = int(ds.num_tokens // seq)
    t0 = _clock()
    train, valid = build_indexed_datasets([(0.9, str(tmp / "big")), (0.1, str(tmp / "big_en"))], seq, n_train,
                                          n_train // 100, seed=1234, cache_dir=str(tmp / "blendcache"))
    out["hibari_blend_build_s"] = _clock() - t0
    out["blend_samples"] = n_train
    w = np.array([0.9, 0.1])
    for n in (n_train, 25_600_000):  # 25.6M samples = Swallow's 25,000 steps x 1024 sequences
        t0 = _clock()
        build_blending_indices(w, n)
        out[f"hibari_greedy_{n}_s"] = _clock() - t0
        out[f"megatron_greedy_{n}_s"] = _megatron_blend(w, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0, help="MB of text for the tokenize benchmark")
    ap.add_argument("--tokens", type=float, default=1e9, help="synthetic dataset size for the index benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write a markdown summary here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = bench_tokenize(args.mb, Path(tmp), args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        idx = bench_index(int(args.tokens), Path(tmp))
    print(json.dumps({"tokenize": tok, "index": idx}, indent=1))
    if args.out:
        fmt = lambda v: "n/a (megatron-core not installed)" if v is None else f"{v:.2f} s"  # noqa: E731
        lines = [
            "# `hibari data tokenize` and index-build benchmark", "",
            f"Machine: 2-core CI-class CPU ({platform.processor() or platform.machine()}), "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}. Command: `python -m bench.tokenize_speed --mb {args.mb:g} "
            f"--tokens {args.tokens:g} --out {args.out}`", "",
            "## Tokenize (one worker = one core)", "",
            f"Text: {tok['source']}, replicated to {tok['mb_text']} MB ({tok['documents']:,} documents, "
            f"{tok['tokens']:,} tokens); SentencePiece BPE 8k trained on the same text. Interleaved runs (order rotated each round), best of 7; no BOS/EOS.", "",
            "| path | tokens/s per core | CPU time |", "|---|---|---|",
            f"| raw `SentencePieceProcessor.encode`, docs in memory (baseline) | {tok['raw_tokens_per_s']:,.0f} | "
            f"{tok['raw_s']:.2f} s |",
            f"| batched encode as `data tokenize` calls it (SentencePiece, ~1M characters per call, one thread, "
            f"numpy ids), docs in memory | {tok['batch_tokens_per_s']:,.0f} | {tok['batch_s']:.2f} s |",
            f"| bare loop over the same .jsonl.zst: zstandard stream_reader + text lines + `json.loads` + `encode` "
            f"(JSONL baseline) | {tok['jsonl_tokens_per_s']:,.0f} | {tok['jsonl_s']:.2f} s |",
            f"| `read_jsonl` of the .jsonl.zst shard + `encode` (no writing) | {tok['read_tokens_per_s']:,.0f} | "
            f"{tok['read_s']:.2f} s |",
            f"| `hibari data tokenize --workers 1` (read .zst JSONL, encode, write .bin/.idx, merge) | "
            f"{tok['hibari_tokens_per_s']:,.0f} | {tok['hibari_s']:.2f} s |", "",
            f"**`data tokenize` runs at {tok['raw_s'] / tok['hibari_s']:.2f}x the tokens per CPU-second of the bare "
            f"encode loop over documents in memory** (issue 22 goal: >= 0.9x), reading, decompressing and parsing the "
            f"JSONL.zst shard and writing/merging the dataset included; against the bare loop over the same JSONL.zst "
            f"(which reads and parses it too) it runs at **{tok['jsonl_s'] / tok['hibari_s']:.2f}x**. It encodes in batches (one SentencePiece call per ~1M "
            f"characters, one thread, numpy ids: {tok['raw_s'] / tok['batch_s']:.2f}x the loop's speed here) and writes "
            f"each batch's ids in one block (data_pipeline/indexed/encode_batches.py). Writer overhead (tokenize vs read + per-document "
            f"encode): {tok['writer_overhead_pct']:.1f}%. The machine was shared with other jobs (load average "
            f"{os.getloadavg()[0]:.1f}); times are CPU seconds, interleaved, best of 7.", "",
            "## Index build, synthetic dataset", "",
            f"{idx['tokens']:,} tokens in {idx['documents']:,} documents, seq_length {idx['seq_length']}.", "",
            "| step (CPU seconds) | hibari (numpy) | Megatron-core (helpers_cpp + numpy) |", "|---|---|---|",
            f"| sample/shuffle index, 1 epoch | {idx['hibari_build_1ep_s']:.2f} s | "
            f"{fmt(idx['megatron_build_1ep_s'])} |",
            f"| sample/shuffle index, 3 epochs | {idx['hibari_build_3ep_s']:.2f} s | "
            f"{fmt(idx['megatron_build_3ep_s'])} |",
            f"| reopen from cache, 1 epoch / 3 epochs | {idx['hibari_cached_1ep_s']:.3f} s / "
            f"{idx['hibari_cached_3ep_s']:.3f} s | - |",
            f"| `build_indexed_datasets`, 90/10 blend, {idx['blend_samples']:,} train samples + valid, cold | "
            f"{idx['hibari_blend_build_s']:.2f} s | - |",
        ]
        for n in (idx["blend_samples"], 25_600_000):
            lines.append(f"| greedy blend schedule, {n:,} samples | {idx[f'hibari_greedy_{n}_s']:.2f} s | "
                         f"{fmt(idx[f'megatron_greedy_{n}_s'])} |")
        lines += ["", "The greedy blend schedule is sequential by nature; hibari computes it exactly (identical to "
                      "Megatron's helpers_cpp, tested) with vectorized guess-and-verify blocks, falling back to a "
                      "plain Python loop where guesses keep failing (3+ datasets), and caches the result, so it is "
                      f"paid once per (weights, samples). Load average during the run: {os.getloadavg()[0]:.1f} "
                      "on 2 cores."]
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
