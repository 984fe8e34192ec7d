"""Corpus-cleaning benchmarks (not part of `make test`).

1. Filter stage (Swallow quality features + decision + NG-word ratio) in docs/s on one core, against, in the same
   run and on the same documents: a plain transcription of the Swallow authors' feature code, datatrove's
   GopherRepetitionFilter + GopherQualityFilter (language Japanese), and HojiChar's five light document filters.
2. Extraction pages/s: trafilatura (comments and tables off) vs resiliparse, on the shared real Japanese pages.
3. `--clean`: `corpus clean` end to end (one worker, CPU time, per-stage profile) on a Common-Crawl-like mix with
   5% Japanese pages and on a Japanese-only file, for each `extract.extractor` (-> results/corpus_clean.md).
   Extraction quality per extractor: bench/extract_quality.py.

    python bench/corpus.py [--docs ../shared/data/quality-agreement/corpus_heldout.jsonl] [--write]
    python bench/corpus.py --clean [--clean-extractors trafilatura,trafilatura_pretrim] [--write]

Baselines that are not installed are reported as such. Needs ../shared/data (real documents).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, whose tokenize.py would shadow the stdlib module of that name
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

# ------------------------------------------------------------------ the authors' feature code, transcribed plainly
_RE_SENT = re.compile(r"[^。．！？!?]+[。．！？!?]?")
_RE_KANJI = re.compile(r"[々〇〻\u3400-\u9FFF\uF900-\uFAFF]|[\uD840-\uD87F][\uDC00-\uDFFF]")


def reference_features(text: str) -> dict:
    doc = [_RE_SENT.findall(line) for line in text.split("\n")]
    paragraphs = ["".join(s) for s in doc]
    sentences = list(itertools.chain.from_iterable(doc))
    r = {}

    def dup(items):
        c = collections.Counter(items)
        return sum(f - 1 for f in c.values()), sum(len(s) * (f - 1) for s, f in c.items())

    a, b = dup(paragraphs)
    total = sum(len(p) for p in paragraphs)
    r["duplicate_paragraph_fraction"] = a / len(paragraphs) if paragraphs else 0.0
    r["duplicate_paragraph_fraction_in_character"] = b / total if total else 0.0
    a, b = dup(sentences)
    total = sum(len(s) for s in sentences)
    r["duplicate_sentence_fraction"] = a / len(sentences) if sentences else 0.0
    r["duplicate_sentence_fraction_in_character"] = b / total if total else 0.0
    for n in range(2, 5):
        c = collections.Counter([text[i:i + n] for i in range(len(text) - n + 1)])
        r[f"top_{n}gram_character_fraction"] = c.most_common(1)[0][1] / sum(c.values()) if c else 0.0
    for n in range(5, 11):
        c = collections.Counter([text[i:i + n] for i in range(len(text) - n + 1)])
        r[f"duplicate_{n}gram_character_fraction"] = sum(1 for f in c.values() if f > 1) / len(c) if c else 0.0
    hira = kata = toten = kuten = 0
    for ch in text:
        o = ord(ch)
        if 0x3041 <= o <= 0x3096:
            hira += 1
        elif 0x30A1 <= o <= 0x30FA:
            kata += 1
        elif ch in ("、", "，"):
            toten += 1
        elif ch in ("。", "．", "！", "？"):
            kuten += 1
    kanji = len(_RE_KANJI.findall(text))
    nja = hira + kata + kanji + kuten + toten
    r.update(num_letters=len(text), num_japanese_letters=nja)
    r["hiragana_fraction"] = hira / nja if nja else 0.0
    r["avg_sentence_length"] = sum(len(s) for s in sentences) / len(sentences) if sentences else 0.0
    r["max_sentence_length"] = max((len(s) for s in sentences), default=0)
    r["ellipsis_fraction"] = (sum(1 for s in sentences if s.strip().endswith(("・", "…"))) / len(sentences)
                              if sentences else 0.0)
    return r


# ------------------------------------------------------------------ timing
def docs_per_s(fn, docs, min_seconds: float = 2.0, max_rounds: int = 5) -> float:
    """Best of a few rounds (the machine is shared; the best round is the least disturbed one)."""
    best = 0.0
    rounds = 0
    start = time.perf_counter()
    while rounds < max_rounds and (rounds < 2 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        for d in docs:
            fn(d)
        best = max(best, len(docs) / (time.perf_counter() - t0))
        rounds += 1
    return best


def interleaved_rates(impls: dict, docs: list[str], rounds: int = 2, chunk: int = 100) -> dict[str, float]:
    """docs/s of each implementation, timed chunk by chunk in turn, so that load from other jobs on a shared
    machine hits all of them alike and their ratios stay meaningful."""
    spent = dict.fromkeys(impls, 0.0)
    for _ in range(rounds):
        for start in range(0, len(docs), chunk):
            part = docs[start:start + chunk]
            for name, fn in impls.items():
                t0 = time.perf_counter()
                if getattr(fn, "batch", False):  # takes the chunk at once (documents arrive in batches)
                    fn(part)
                else:
                    for d in part:
                        fn(d)
                spent[name] += time.perf_counter() - t0
    return {name: rounds * len(docs) / t for name, t in spent.items()}


FULL = "hibari `quality_features`+`quality_decision`+NG ratio (full Swallow set)"
FULL_PER_DOC = "hibari full set, per-document `quality_features`"
KEEP = "hibari `quality_keep` (same decision, early exit; what `corpus clean` runs)"


def bench_filters(docs: list[str], slow_docs: int) -> list[tuple[str, float | None, float | None, str]]:
    """Rows (name, docs/s, docs/s of hibari's full set in the same interleaved group, note)."""
    from data_pipeline.filters import (NGWordMatcher, quality_decision, quality_features, quality_features_batch,
                                       quality_keep)

    ng = NGWordMatcher.default()

    def full(texts):
        return [quality_decision(f) for f in quality_features_batch(texts, ng)]

    full.batch = True

    def full_per_doc(text):
        return quality_decision(quality_features(text, ng))

    fast = {FULL: full, FULL_PER_DOC: full_per_doc, KEEP: lambda t: quality_keep(t, ng)}
    notes = {FULL: "30 features + 2 NG features, all rules; `quality_features_batch` on each 100-doc chunk",
             FULL_PER_DOC: "same values, one call per document",
             KEEP: "n-gram stats / NG scan only if still kept"}
    missing: list[tuple[str, str]] = []
    try:
        from hojichar import Compose, Document as HDocument
        import hojichar.filters.document_filters as hf

        filters = [hf.DocumentLengthFilter(min_doc_len=400), hf.AcceptJapanese(), hf.DiscardRareKuten(),
                   hf.CharRepetitionRatioFilter(), hf.DiscardTooManyEndingEllipsis()]
        pipeline = Compose(filters)

        def every_filter(text):
            doc = HDocument(text)
            for f in filters:
                f.apply(doc)
            return doc

        name = ("HojiChar 5 light filters (DocumentLength, AcceptJapanese, DiscardRareKuten, CharRepetitionRatio, "
                "DiscardTooManyEndingEllipsis)")
        fast[name] = lambda t: pipeline.apply(HDocument(t))
        notes[name] = "Compose: stops at first rejection"
        fast["HojiChar same 5 filters, every filter on every doc"] = every_filter
        notes["HojiChar same 5 filters, every filter on every doc"] = "no early exit"
    except ImportError as err:
        missing.append(("HojiChar 5 light filters", f"not installed ({err})"))
    rates = interleaved_rates(fast, docs)
    rows = [(name, rate, rates[FULL], notes[name]) for name, rate in rates.items()]

    slow = {FULL: full, "Swallow authors' feature code (plain transcription)": reference_features}
    notes["Swallow authors' feature code (plain transcription)"] = "features only, no decision/NG"
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
        from datatrove.utils.typeshelper import Languages

        rep = GopherRepetitionFilter(language=Languages.japanese)
        qual = GopherQualityFilter(language=Languages.japanese)

        def gopher(text):
            doc = Document(text=text, id="x")
            return rep.filter(doc), qual.filter(doc)

        for t in docs[:20]:  # load the Japanese word tokenizer (spaCy + SudachiPy) outside the timing
            gopher(t)
        name = "datatrove GopherRepetitionFilter + GopherQualityFilter (Japanese)"
        slow[name] = gopher
        notes[name] = "both filters on every doc"
    except Exception as err:  # noqa: BLE001 - missing optional deps (spacy[ja]) surface at first use
        missing.append(("datatrove Gopher pair", f"not available ({type(err).__name__}: {err})"))
    slow_rates = interleaved_rates(slow, docs[:slow_docs], rounds=1, chunk=50)
    rows += [(f"{name} (first {slow_docs} docs)", rate, slow_rates[FULL], notes[name])
             for name, rate in slow_rates.items() if name != FULL]
    rows += [(name, None, None, note) for name, note in missing]
    return rows


def bench_extraction(limit_s: float = 60.0) -> list[tuple[str, float | None, str]]:
    from data_pipeline.corpus.warc import decode_html

    pages = []
    for index in (SHARED / "ja-html" / "index.jsonl", SHARED / "non-ja-html-negatives" / "index.jsonl"):
        base = index.parent
        for line in index.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            path = base / rec["file"] if (base / rec["file"]).is_file() else None
            if path is None:
                continue
            decoded = decode_html(path.read_bytes(), "")
            if decoded:
                pages.append(decoded[0])
    import trafilatura
    from resiliparse.extract.html2text import extract_plain_text

    rows = []
    for name, fn in (("trafilatura (comments, tables off)",
                      lambda h: trafilatura.extract(h, include_comments=False, include_tables=False)),
                     ("resiliparse extract_plain_text(main_content=True)",
                      lambda h: extract_plain_text(h, main_content=True))):
        rows.append((name, docs_per_s(fn, pages, max_rounds=2), f"{len(pages)} real pages (ja + negatives)"))
    return rows


# ------------------------------------------------------------------ corpus clean end to end (issue 22)
def _response_blocks(path: Path) -> list[tuple[str, bytes]]:
    """(url, raw HTTP block) of every response record of a WARC file."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with open(path, "rb") as f:
        return [(rec.headers.get("WARC-Target-URI", "").strip("<>"), rec.reader.read())
                for rec in ArchiveIterator(f, parse_http=False, record_types=WarcRecordType.response)]


def _write_warc(path: Path, pages: list[tuple[str, bytes]]) -> Path:
    import gzip
    import uuid

    records = [b"WARC/1.1\r\nWARC-Type: warcinfo\r\nContent-Length: 26\r\n\r\nisPartOf: CC-MAIN-2024-10\r\n\r\n\r\n"]
    for i, (url, block) in enumerate(pages):
        rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{i}:{url}")
        records.append((f"WARC/1.1\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
                        f"WARC-Date: 2024-03-01T12:00:00Z\r\nWARC-Target-URI: {url}\r\n"
                        f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(block)}\r\n\r\n"
                        ).encode() + block + b"\r\n\r\n")
    path.write_bytes(b"".join(gzip.compress(r, compresslevel=1) for r in records))
    return path


def build_mixes(out_dir: Path, records: int = 3000, ja_fraction: float = 0.05) -> tuple[Path, Path]:
    """A Common-Crawl-like WARC (`records` responses, `ja_fraction` of them Japanese) and a Japanese-only WARC,
    from real pages: the 39 Japanese and 10 non-Japanese pages of ja-warc-assembled plus the responses of the real
    CC extract (resiliparse/warcfile) and dolma's two crawls as the non-Japanese majority. Each page repeats under
    its own URL path (`?r=N`), so every record is a distinct document for the pipeline."""
    meta = {json.loads(l)["url"]: json.loads(l)["expected_is_japanese"] for l in
            (SHARED / "ja-warc-assembled" / "records.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()}
    assembled = _response_blocks(SHARED / "ja-warc-assembled" / "ja-html-assembled.warc.gz")
    ja = [(u, b) for u, b in assembled if meta.get(u)]
    other = [(u, b) for u, b in assembled if meta.get(u) is False]
    for name in ("resiliparse/warcfile.warc.gz", "dolma/sample-0000.warc.gz", "dolma/sample-0001.warc.gz"):
        other += _response_blocks(SHARED / "warc-samples" / name)
    n_ja = round(records * ja_fraction)
    picks = [ja[i % len(ja)] for i in range(n_ja)] + [other[i % len(other)] for i in range(records - n_ja)]
    picks = [picks[(i * 7919) % len(picks)] for i in range(len(picks))] if len(picks) % 7919 else picks
    sep = lambda u, i: f"{u}{'&' if '?' in u else '?'}r={i}"  # noqa: E731
    mix = _write_warc(out_dir / "cc-like-mix.warc.gz", [(sep(u, i), b) for i, (u, b) in enumerate(picks)])
    ja_only = _write_warc(out_dir / "ja-only.warc.gz", [(sep(u, i), b) for i, (u, b) in enumerate(ja * 4)])
    return mix, ja_only


def clean_cpu(warc: Path, out_dir: Path, extractor: str) -> dict:
    """One `corpus clean` task (one worker, in this process) on `warc`: CPU seconds in total and per stage
    (each step's process time; "read+write" = the rest: WARC reading, HTTP/record I/O, output, ledger)."""
    import shutil

    from data_pipeline.corpus import steps as steps_mod
    from data_pipeline.corpus.config import CleanConfig
    from data_pipeline.corpus.pipeline import clean_shard

    stage_cpu: dict[str, float] = collections.defaultdict(float)
    original = steps_mod.Step.__call__

    def timed(self, page):
        t0 = time.process_time()
        try:
            return original(self, page)
        finally:
            stage_cpu[self.name] += time.process_time() - t0

    cfg = CleanConfig.model_validate({"extract": {"extractor": extractor}}).model_dump()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    steps_mod.Step.__call__ = timed
    try:
        t0 = time.process_time()
        counters = clean_shard(str(warc), str(out_dir / "out.jsonl.zst"), cfg, ledger=str(out_dir / "ledger.jsonl.zst"))
        total = time.process_time() - t0
    finally:
        steps_mod.Step.__call__ = original
    stages = {s["name"]: s for s in counters["stages"]} if "stages" in counters else {}
    return {"cpu": total, "stage_cpu": dict(stage_cpu), "counters": counters, "stages": stages}


def bench_clean(extractors: list[str], rounds: int, records: int) -> list[str]:
    import tempfile

    from data_pipeline.corpus import steps as steps_mod
    from data_pipeline.corpus.config import CleanConfig

    steps_mod.build_steps(CleanConfig())  # imports (py3langid, trafilatura, ...) outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mix, ja_only = build_mixes(tmp, records)
        for ex in extractors:  # warm-up: lazy imports and model loads (py3langid, trafilatura) outside the timing
            clean_cpu(ja_only, tmp / "out", ex)
        runs: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        for _ in range(rounds):  # interleaved: A, B, A, B ... so load from other jobs hits all alike
            for warc in (mix, ja_only):
                for ex in extractors:
                    runs[(warc.name, ex)].append(clean_cpu(warc, tmp / "out", ex))
    lines = [f"## `corpus clean` end to end, one worker ({rounds} interleaved rounds, best round quoted)", "",
             f"`cc-like-mix.warc.gz`: {records:,} response records, 5% Japanese (the 39 Japanese pages of "
             "ja-warc-assembled, repeated), 95% non-Japanese (its 10 negatives + the real CC extract of "
             "resiliparse/warcfile + dolma's two crawls, repeated); `ja-only.warc.gz`: the 39 Japanese pages x 4. "
             "CPU = process time of the whole task (reading, all stages, output, ledger).", "",
             "| file | extractor | records | CPU s | records per CPU-second | extracted pages | CPU ms per extracted "
             "page | kept docs |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    best = {}
    for (wname, ex), rs in runs.items():
        r = min(rs, key=lambda x: x["cpu"])
        best[(wname, ex)] = r
        st = r["counters"]
        n = st.get("records_read") or st.get("responses") or records
        extract = next((s for s in st.get("stages", []) if s["name"] == "extract"), {})
        extracted = extract.get("pages_in", 0)
        lines.append(f"| {wname} | `{ex}` | {n:,} | {r['cpu']:.2f} | {n / r['cpu']:,.0f} | {extracted} | "
                     f"{r['cpu'] / max(extracted, 1) * 1000:.1f} | {st.get('written', st.get('records_written', '?'))} |")
    lines += ["", "Per-stage CPU seconds (process time inside each step; read+write = the rest of the task):", "",
              "| file | extractor | " + " | ".join(STAGES) + " | read+write |", "|---|---|" + "---:|" * (len(STAGES) + 1)]
    for (wname, ex), r in best.items():
        inside = sum(r["stage_cpu"].values())
        lines.append(f"| {wname} | `{ex}` | " + " | ".join(f"{r['stage_cpu'].get(s, 0.0):.2f}" for s in STAGES)
                     + f" | {r['cpu'] - inside:.2f} |")
    return lines


STAGES = ("http", "url_blocklist", "decode", "rapid_ja", "extract", "language", "quality", "ngword", "cleanup")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default=str(SHARED / "quality-agreement" / "corpus_heldout.jsonl"))
    ap.add_argument("--datatrove-docs", type=int, default=300,
                    help="datatrove and the authors' code are slow: time them on this many")
    ap.add_argument("--no-extraction", action="store_true")
    ap.add_argument("--clean", action="store_true",
                    help="only `corpus clean` end to end on a CC-like mix and a Japanese-only file (issue 22)")
    ap.add_argument("--clean-extractors", default="trafilatura,resiliparse_pretrim")
    ap.add_argument("--clean-records", type=int, default=3000)
    ap.add_argument("--clean-rounds", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write bench/results/corpus.md")
    args = ap.parse_args()
    if args.clean:
        head = ["# `corpus clean` throughput and per-stage CPU profile (issue 22)", "",
                f"Machine: 2-core CI-class CPU ({platform.machine()}), shared with other jobs (load average "
                f"{os.getloadavg()[0]:.1f}), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python "
                f"{platform.python_version()}. Command: `python bench/corpus.py --clean --clean-rounds "
                f"{args.clean_rounds} --clean-extractors {args.clean_extractors}{' --write' if args.write else ''}`.",
                ""]
        text = "\n".join(head + bench_clean(args.clean_extractors.split(","), args.clean_rounds,
                                            args.clean_records)) + "\n"
        print(text)
        if args.write:
            (REPO / "bench" / "results" / "corpus_clean.md").write_text(text, encoding="utf-8")
        return 0
    path = Path(args.docs)
    if not path.is_file():
        print(f"bench/corpus.py: {path} not found (needs ../shared/data)", file=sys.stderr)
        return 2
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    chars = sum(map(len, docs)) / len(docs)
    rows = bench_filters(docs, args.datatrove_docs)
    lines = [f"# Corpus cleaning benchmark", "",
             f"Machine: 2-core CI-class CPU ({platform.processor() or platform.machine()}, shared with other jobs; "
             f"load average {os.getloadavg()[0]:.1f} at the end), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"Python {platform.python_version()}, one process.",
             f"Command: `python bench/corpus.py{' --write' if args.write else ''}`", "",
             "Implementations are timed chunk by chunk in turn (interleaved), so machine load hits them alike: the "
             "ratio columns are the meaningful numbers; absolute docs/s depend on the load.", "",
             f"## Filter stage (stages 6-7) on {len(docs):,} documents of `{path.name}` ({chars:.0f} chars/doc)", "",
             "| implementation | docs/s per core | hibari full set is ... x faster | notes |", "|---|---:|---:|---|"]
    for name, rate, full_rate, note in rows:
        if rate:
            lines.append(f"| {name} | {rate:,.0f} | {full_rate / rate:.2f}x | {note} |")
        else:
            lines.append(f"| {name} | n/a | - | {note} |")
    if not args.no_extraction:
        lines += ["", "## Extraction (stage 4)", "", "| extractor | pages/s per core | notes |", "|---|---:|---|"]
        for name, rate, note in bench_extraction():
            lines.append(f"| {name} | {rate:,.1f} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        out = REPO / "bench" / "results" / "corpus.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
