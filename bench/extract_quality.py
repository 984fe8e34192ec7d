"""Main-text extraction: quality against human ground truth and CPU time per page, for every `extract.extractor`.

Quality (../shared/data, real pages; see SOURCES.md there):
- F1: character-bigram F1 (NFKC, whitespace removed; Japanese has no word boundaries) of the extracted text against
  full main-content ground truth: magic-html's human annotations (7 pages), readability's expected HTML (2),
  newspaper4k's expected text (2).
- Snippets: postlight's expected start of the main content (first 30 characters, whitespace-insensitive) found in
  the text (26 pages); trafilatura's must-contain / must-not-contain snippets (1 Japanese page + 10 non-Japanese).
Speed: CPU seconds (time.process_time) per page on the 40 Japanese pages, methods interleaved page by page over
several rounds, so load from other jobs on the shared machine hits all methods alike.

    python bench/extract_quality.py [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import unicodedata
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def _norm(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def bigram_f1(predicted: str, truth: str) -> float:
    p, t = _norm(predicted), _norm(truth)
    pc = Counter(p[i:i + 2] for i in range(len(p) - 1))
    tc = Counter(t[i:i + 2] for i in range(len(t) - 1))
    overlap = sum((pc & tc).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pc.values()), overlap / sum(tc.values())
    return 2 * precision * recall / (precision + recall)


def _html_text(path: Path) -> str:
    import lxml.html
    return lxml.html.fromstring(path.read_text(encoding="utf-8")).text_content()


def load_pages() -> list[dict]:
    """Each page: name, html (decoded like `corpus clean` decodes), japanese, and its expectations."""
    from data_pipeline.corpus.warc import decode_html

    pages = []
    for index, japanese in ((SHARED / "ja-html" / "index.jsonl", True),
                            (SHARED / "non-ja-html-negatives" / "index.jsonl", False)):
        base = index.parent
        for line in index.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            decoded = decode_html((base / rec["file"]).read_bytes(), "")
            if decoded is None:
                continue
            exp = rec.get("expected") or {}
            page = {"name": rec["file"], "html": decoded[0], "japanese": japanese, "truth": None,
                    "start": None, "must": exp.get("must_contain") or [], "must_not": exp.get("must_not_contain") or []}
            if "main_content" in exp:
                page["truth"] = exp["main_content"]
            elif "readability_html" in exp:
                page["truth"] = _html_text(base / exp["readability_html"])
            elif "text_file" in exp:
                page["truth"] = (base / exp["text_file"]).read_text(encoding="utf-8")
            if exp.get("content_start"):
                page["start"] = _norm(exp["content_start"])[:30]
            pages.append(page)
    return pages


def score(pages: list[dict], texts: dict[str, str]) -> dict:
    f1 = [bigram_f1(texts[p["name"]], p["truth"]) for p in pages if p["truth"]]
    starts = [p["start"] in _norm(texts[p["name"]]) for p in pages if p["start"]]
    must = [_norm(s) in _norm(texts[p["name"]]) for p in pages for s in p["must"]]
    must_not = [_norm(s) not in _norm(texts[p["name"]]) for p in pages for s in p["must_not"]]
    return {"f1": sum(f1) / len(f1), "f1_n": len(f1), "f1_each": f1, "starts": sum(starts), "starts_n": len(starts),
            "must": sum(must), "must_n": len(must), "must_not": sum(must_not), "must_not_n": len(must_not)}


def cpu_per_page(extractors: dict, htmls: list[str], rounds: int) -> dict[str, float]:
    spent = dict.fromkeys(extractors, 0.0)
    for _ in range(rounds):
        for html in htmls:
            for name, fn in extractors.items():
                t0 = time.process_time()
                fn(html)
                spent[name] += time.process_time() - t0
    return {name: s / (rounds * len(htmls)) for name, s in spent.items()}


def rapid_check_cpu(htmls: list[str], rounds: int) -> float:
    """CPU per page of the rapid Japanese check (regexes on the first 64 KB + LID of the title)."""
    from data_pipeline.corpus.config import CleanConfig
    from data_pipeline.corpus.steps import LanguageIdentifier, RapidJapanese
    from data_pipeline.corpus.warc import Page

    cfg = CleanConfig()
    lid = LanguageIdentifier(cfg)
    lid.language("warm-up: load the model outside the timing")
    step = RapidJapanese(cfg, lid)
    t0 = time.process_time()
    for _ in range(rounds):
        for html in htmls:
            step.apply(Page(id="x", url="", host="", date="", snapshot="", warc_file="", body=b"", html=html))
    return (time.process_time() - t0) / (rounds * len(htmls))


def main() -> int:
    from data_pipeline.corpus.extract import EXTRACTORS, make_extractor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write bench/results/extract_quality.md")
    args = ap.parse_args()
    if not (SHARED / "ja-html" / "index.jsonl").is_file():
        print("bench/extract_quality.py: needs ../shared/data", file=sys.stderr)
        return 2
    pages = load_pages()
    extractors = {m: make_extractor(m) for m in EXTRACTORS}
    texts = {m: {p["name"]: fn(p["html"]) for p in pages} for m, fn in extractors.items()}
    scores = {m: score(pages, texts[m]) for m in EXTRACTORS}
    ja_htmls = [p["html"] for p in pages if p["japanese"]]
    cpu = cpu_per_page(extractors, ja_htmls, args.rounds)
    rapid = rapid_check_cpu(ja_htmls, args.rounds)
    base = cpu["trafilatura"]
    lines = ["# Extraction quality and speed (bench/extract_quality.py)", "",
             f"Machine: 2-core CI-class CPU ({platform.machine()}), shared with ~8 other jobs (load average "
             f"{os.getloadavg()[0]:.1f}), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python "
             f"{platform.python_version()}, one process. Command: `python bench/extract_quality.py --rounds "
             f"{args.rounds}{' --write' if args.write else ''}`.", "",
             "CPU time (process time, not wall clock) per page on the 40 real Japanese pages of `ja-html/`, methods "
             f"interleaved page by page, {args.rounds} rounds. F1 = character-bigram F1 (NFKC, whitespace removed) "
             f"against full main-content ground truth on {scores['trafilatura']['f1_n']} pages "
             "(magic-html human annotations 7, readability 2, newspaper4k 2). Starts = postlight's expected first 30 "
             "characters found. Must / must-not = trafilatura's snippets (1 Japanese + 10 non-Japanese pages).", "",
             "| extractor | CPU ms/page | speed-up vs trafilatura | mean F1 | starts found | must-contain | "
             "must-not-contain ok | same text as `trafilatura` |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in EXTRACTORS:
        s = scores[m]
        same = sum(texts[m][p["name"]] == texts["trafilatura"][p["name"]] for p in pages)
        lines.append(f"| `{m}` | {cpu[m] * 1000:.1f} | {base / cpu[m]:.2f}x | {s['f1']:.3f} | "
                     f"{s['starts']}/{s['starts_n']} | {s['must']}/{s['must_n']} | {s['must_not']}/{s['must_not_n']} | "
                     f"{same}/{len(pages)} |")
    lines += ["", "F1 per ground-truth page (same order: magic-html x7, readability x2, newspaper4k x2):", "",
              "| extractor | " + " | ".join(f"p{i + 1}" for i in range(scores['trafilatura']['f1_n'])) + " |",
              "|---|" + "---:|" * scores["trafilatura"]["f1_n"]]
    for m in EXTRACTORS:
        lines.append(f"| `{m}` | " + " | ".join(f"{v:.2f}" for v in scores[m]["f1_each"]) + " |")
    lines += ["", f"Rapid Japanese check before extraction (regexes on the first 64 KB + py3langid on the title): "
              f"{rapid * 1000:.2f} ms CPU per page — it parses no tree, so there is no parsed tree to share with "
              "the extractor; the saving available there is bounded by this number."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (REPO / "bench" / "results" / "extract_quality.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
