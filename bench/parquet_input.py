"""Benchmark `hibari data tokenize` from parquet / arrow (save_to_disk) input vs the JSONL.zst path.

The same documents are written as one JSONL.zst shard, one parquet file (zstd, row groups of 1,000 documents) and
a `datasets.save_to_disk`-layout arrow file; each is tokenized with `tokenize_corpus(workers=1)` (read + encode +
.bin/.idx write + merge, all in this process) and read alone (`iter_texts`, no encoding). Runs are interleaved and
the best of N is kept; times are CPU seconds of this process (`time.process_time`), so a loaded shared machine
distorts the ratios little. Goal: parquet input tokenizes at >= the JSONL.zst path's tokens per CPU second.
The outputs of every format are checked to be byte-identical.

Usage: python -m bench.parquet_input [--mb 10] [--reps 5] [--out bench/results/parquet_input.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tokenize_speed import load_texts  # noqa: E402 - the same shared Japanese web text as bench/tokenize

_clock = time.process_time


def _write_inputs(tmp: Path, corpus: list[str]) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hibari.io import write_jsonl

    write_jsonl(tmp / "corpus.jsonl.zst", ({"text": t} for t in corpus))
    table = pa.table({"text": corpus})
    # no dictionary encoding: the replicated corpus would collapse into it (real web documents are unique)
    pq.write_table(table, tmp / "corpus.parquet", row_group_size=1000, compression="zstd", use_dictionary=False)
    saved = tmp / "saved"  # the save_to_disk layout (state.json + arrow IPC stream), written without `datasets`
    saved.mkdir()
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=1000)
    (saved / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    return {"jsonl.zst": str(tmp / "corpus.jsonl.zst"), "parquet": str(tmp / "corpus.parquet"), "saved": str(saved)}


def bench(mb: float, reps: int, tmp: Path) -> dict:
    from data_pipeline.indexed.tokenize import tokenize_corpus
    from data_pipeline.readers import iter_texts, resolve_inputs
    from data_pipeline.tokenizer.spm import train_tokenizer
    from hibari.io import write_jsonl

    texts, source = load_texts()
    write_jsonl(tmp / "train.jsonl", ({"text": t} for t in texts))
    train_tokenizer([str(tmp / "train.jsonl")], 8000, tmp / "tok", threads=1, show_progress=False)
    corpus, size = [], 0
    while size < mb * 1e6:
        for t in texts:
            corpus.append(t)
            size += len(t.encode("utf-8"))
    inputs = _write_inputs(tmp, corpus)
    tok_times = {k: [] for k in inputs}
    read_times = {k: [] for k in inputs}
    tokens = {}
    for rep in range(reps):  # interleaved: each round runs every format once
        for name, path in inputs.items():
            t0 = _clock()
            n = sum(1 for s in resolve_inputs([path]) for _ in iter_texts(s))
            read_times[name].append(_clock() - t0)
            assert n == len(corpus)
            out = tmp / f"out-{name}-{rep}"
            t0 = _clock()
            s = tokenize_corpus([path], str(tmp / "tok"), str(out), workers=1, add_bos=False, show_progress=False)
            tok_times[name].append(_clock() - t0)
            tokens[name] = s["tokens"]
    first = {name: (tmp / f"out-{name}-0.bin").read_bytes() for name in inputs}
    identical = all(b == first["jsonl.zst"] for b in first.values())
    n_tokens = tokens["jsonl.zst"]
    assert all(t == n_tokens for t in tokens.values())
    return {"source": source, "documents": len(corpus), "mb_text": round(size / 1e6, 1), "tokens": n_tokens,
            "identical": identical, "sizes_mb": {k: _size_mb(Path(p)) for k, p in inputs.items()},
            "tokenize_s": {k: min(v) for k, v in tok_times.items()},
            "read_s": {k: min(v) for k, v in read_times.items()}}


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.rglob("*"))
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="MB of UTF-8 text")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "parquet_input.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = bench(args.mb, args.reps, Path(tmp))
    n = r["tokens"]
    labels = {"jsonl.zst": "JSONL.zst shard (baseline)", "parquet": "parquet file (zstd, row groups of 1,000)",
              "saved": "save_to_disk directory (arrow stream)"}
    rows = [f"| {labels[k]} | {r['sizes_mb'][k]} MB | {n / r['tokenize_s'][k]:,.0f} | {r['tokenize_s'][k]:.2f} s | "
            f"{r['read_s'][k]:.3f} s |" for k in labels]
    ratio = r["tokenize_s"]["jsonl.zst"] / r["tokenize_s"]["parquet"]
    read_ratio = r["read_s"]["jsonl.zst"] / r["read_s"]["parquet"]
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Parquet / arrow input for `hibari data tokenize`", "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}, shared and loaded "
        f"(load average {load:.1f}). Command: `python -m bench.parquet_input --mb {args.mb:g} --reps {args.reps}`", "",
        f"Text: {r['source']}, replicated to {r['mb_text']} MB ({r['documents']:,} documents, {n:,} tokens); "
        f"SentencePiece BPE 8k. `tokenize_corpus(workers=1)` (read + encode + write + merge, in this process) and "
        f"the reader alone (`iter_texts`); interleaved runs, best of {args.reps}, CPU seconds.", "",
        "| input | size on disk | tokens per CPU-s (tokenize) | tokenize CPU time | read-only CPU time |",
        "|---|---|---|---|---|", *rows, "",
        f"Parquet input: **{ratio:.2f}x** the JSONL.zst path's tokens per CPU second (goal >= 1.0). The .bin files "
        f"of all three inputs are {'byte-identical' if r['identical'] else 'NOT identical'}. Reading alone, parquet "
        f"is {read_ratio:.1f}x faster than JSONL.zst (no JSON parsing, only the text column), but reading is a small "
        f"part of tokenizing (SentencePiece dominates), so the end-to-end ratio sits near 1. The replicated corpus "
        f"compresses unrealistically well as JSONL.zst (long-range repeats), which flatters the baseline.", ""])
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
