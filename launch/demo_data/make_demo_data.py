"""Generate hibari's embedded demo data (deterministic; rerun to reproduce the committed files byte for byte).

    python launch/demo_data/make_demo_data.py [--out launch/demo_data]

Writes
- `warc/CC-MAIN-2024-10/CC-MAIN-2024-10-demo-0000{0,1}.warc.gz` and the same for CC-MAIN-2024-18: two "snapshots" of
  a shrunk Japanese web crawl (WARC/1.1, one gzip member per record, HTTP 200 text/html response records, plus the
  kinds of records a crawl really holds: warcinfo, 404s, images). Page kinds: good articles, the same articles under
  a second URL, re-crawls of earlier articles in the later snapshot (unchanged or lightly edited), a mirror host
  that copies other sites' articles, boilerplate, repeated spam, ellipsis link-teaser pages, katakana-heavy product
  lists, English pages, good articles on blocked hosts (`*.5ch.net`, `*wikipedia.org`), Shift_JIS / EUC-JP pages.
- `english.jsonl.zst`: a small English corpus (the stand-in base tokenizer's training text and the 10% replay blend).
- `manifest.json`: every record with its kind and the fate the Swallow recipe should give it, plus expected counts.

All text comes from the hand-written sentence banks beside this script (`bank_ja.py`, `bank_en.py`), combined by
a seeded generator: no third-party text is copied.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bank_en  # noqa: E402
import bank_ja  # noqa: E402

SEED = 20240521
SNAPSHOTS = [("CC-MAIN-2024-10", datetime(2024, 2, 20, tzinfo=timezone.utc)),
             ("CC-MAIN-2024-18", datetime(2024, 4, 12, tzinfo=timezone.utc))]
FILES_PER_SNAPSHOT = 2
N_NEW_ARTICLES = 60  # new good articles per snapshot
N_URL_VARIANTS = 4  # snapshot 1 articles also served under a second URL (exact duplicates)
N_RECRAWL_SAME = 10  # snapshot 1 articles re-crawled unchanged in snapshot 2
N_RECRAWL_EDITED = 10  # ... re-crawled with a small edit (near-duplicates)
N_MIRROR_COPIES = 11  # snapshot 1 articles copied by a mirror host (crawled before the originals)
N_MIRROR_OWN = 1  # the mirror's own page: removed by the host filter, not by dedup
PER_SNAPSHOT = {"boilerplate": 6, "spam": 6, "teaser": 3, "katakana": 3, "english": 8, "blocked": 4,
                "not_html": 2, "http_404": 2}
N_SHIFT_JIS, N_EUC_JP = 5, 2  # of the new articles per snapshot
N_ENGLISH_DOCS = 300
MIRROR_HOST = "matome-copy.example.jp"
BLOCKED_HOSTS = ["hobby.5ch.net", "ja.wikipedia.org"]
HOST_OF_TOPIC = {"cooking": "daidokoro.example.jp", "travel": "tabi-nikki.example.jp",
                 "garden": "midori-techo.example.jp", "railway": "senro.example.jp",
                 "health": "karada-biyori.example.jp", "programming": "kotsukotsu-dev.example.jp",
                 "history": "machi-rekishi.example.jp", "weather": "sora-moyou.example.jp"}
JA_LETTER = re.compile(r"[\u3041-\u3096\u30a1-\u30fa\u3400-\u9fff\uf900-\ufaff々〇〻、，。．！？]")


# ----------------------------------------------------------------------------------------------------------------
# text generation
def fill(template: str, rng: random.Random, slots: dict | None = None) -> str:
    values = dict(slots or {})
    values.setdefault("place", rng.choice(bank_ja.PLACES))
    values.setdefault("month", rng.randint(1, 12))
    values.setdefault("year", rng.randint(1960, 2023))
    values.setdefault("n", rng.randint(3, 9))
    values.setdefault("n2", rng.randint(4, 12))
    values.setdefault("city", rng.choice(bank_en.CITIES))
    values.setdefault("name", rng.choice(bank_en.NAMES))
    return template.format(**values)


def make_article(rng: random.Random, topic: str) -> dict:
    """A good article: title, opener, 12-16 distinct topic sentences in 3-4 paragraphs, closer."""
    bank = bank_ja.TOPICS[topic]
    slots = {"place": rng.choice(bank_ja.PLACES), "month": rng.randint(1, 12), "year": rng.randint(1960, 2023),
             "n": rng.randint(3, 9), "n2": rng.randint(4, 12)}
    title = fill(rng.choice(bank["titles"]), rng, slots)
    body = [fill(s, rng, slots) for s in rng.sample(bank["sentences"], rng.randint(12, 16))]
    n_par = rng.randint(3, 4)
    cuts = sorted(rng.sample(range(1, len(body)), n_par - 1))
    paragraphs = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    paragraphs.insert(0, [fill(rng.choice(bank_ja.OPENERS), rng, {"title": title})])
    paragraphs.append([rng.choice(bank_ja.CLOSERS)])
    return {"topic": topic, "title": title, "paragraphs": paragraphs}


def article_text(article: dict) -> str:
    return "\n".join("".join(p) for p in article["paragraphs"])


def edit_article(rng: random.Random, article: dict) -> dict:
    """The re-crawled page of the next snapshot: one short update line appended (a near-duplicate)."""
    paragraphs = [list(p) for p in article["paragraphs"]]
    note = fill(rng.choice(bank_ja.UPDATE_NOTES), rng)
    paragraphs[-2] = paragraphs[-2] + [note]
    return {**article, "paragraphs": paragraphs}


def char_ngrams(text: str, n: int = 5) -> set[str]:
    text = text.replace("\n", "")
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def make_english_doc(rng: random.Random, min_sentences: int = 5, max_sentences: int = 9) -> tuple[str, str]:
    topic = rng.choice(sorted(bank_en.TOPICS))
    sents = rng.sample(bank_en.TOPICS[topic], min(len(bank_en.TOPICS[topic]), rng.randint(min_sentences,
                                                                                           max_sentences)))
    slots = {"city": rng.choice(bank_en.CITIES), "name": rng.choice(bank_en.NAMES), "n": rng.randint(3, 12)}
    return topic, " ".join(fill(s, rng, slots) for s in sents)


# ----------------------------------------------------------------------------------------------------------------
# HTML
def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def page_html(title: str, site: str, paragraphs: list[str], lang: str = "ja", charset: str = "utf-8",
              date: str = "", sidebar: list[str] | None = None, copyright_year: int = 2024) -> str:
    """A typical blog page: navigation, the article, a sidebar of links, a footer (only the article is content)."""
    nav = ["ホーム", "記事一覧", "カテゴリー", "お問い合わせ"] if lang == "ja" else ["Home", "Archive", "About"]
    side_title = "人気の記事" if lang == "ja" else "Popular posts"
    sidebar = sidebar or []
    body_ps = "\n".join(f"<p>{_esc(p)}</p>" for p in paragraphs)
    return (f'<!DOCTYPE html>\n<html lang="{lang}">\n<head>\n<meta charset="{charset}">\n'
            f"<title>{_esc(title)} | {_esc(site)}</title>\n</head>\n<body>\n"
            f'<header><div class="logo">{_esc(site)}</div><nav>'
            + " ".join(f'<a href="/{i}/">{_esc(n)}</a>' for i, n in enumerate(nav))
            + "</nav></header>\n<main>\n<article>\n"
            f"<h1>{_esc(title)}</h1>\n" + (f'<p class="date">{date}</p>\n' if date else "")
            + f"{body_ps}\n</article>\n</main>\n"
            f"<aside><h2>{side_title}</h2><ul>"
            + "".join(f'<li><a href="/p/{i}/">{_esc(s)}</a></li>' for i, s in enumerate(sidebar))
            + "</ul></aside>\n"
            f"<footer><p>Copyright (C) {copyright_year} {_esc(site)} All Rights Reserved.</p></footer>\n"
            "</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------------------------
# WARC writing (one gzip member per record, as Common Crawl does)
class WarcWriter:
    def __init__(self, path: Path, filename: str):
        self.buf = io.BytesIO()
        self.path = path
        self.filename = filename

    @staticmethod
    def _record_id(*parts: str) -> str:
        return f"<urn:uuid:{uuid.UUID(hashlib.md5('|'.join(parts).encode()).hexdigest())}>"

    def _write(self, headers: list[tuple[str, str]], block: bytes) -> None:
        head = "WARC/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        head += f"Content-Length: {len(block)}\r\n\r\n"
        record = head.encode("utf-8") + block + b"\r\n\r\n"
        self.buf.write(gzip.compress(record, compresslevel=9, mtime=0))

    def warcinfo(self, date: str, snapshot: str) -> None:
        fields = (f"isPartOf: {snapshot}\r\nsoftware: hibari make_demo_data.py\r\nformat: WARC File Format 1.1\r\n"
                  f"description: hibari demo crawl (synthetic, written for the project)\r\n").encode()
        self._write([("WARC-Type", "warcinfo"), ("WARC-Date", date), ("WARC-Filename", self.filename),
                     ("WARC-Record-ID", self._record_id("warcinfo", self.filename)),
                     ("Content-Type", "application/warc-fields")], fields)

    def response(self, uri: str, date: str, payload: bytes, content_type: str, status: str = "200 OK") -> str:
        http = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
                f"Server: demo\r\n\r\n").encode("ascii") + payload
        rid = self._record_id("response", uri, date)
        self._write([("WARC-Type", "response"), ("WARC-Date", date), ("WARC-Record-ID", rid),
                     ("WARC-Target-URI", uri), ("Content-Type", "application/http; msgtype=response")], http)
        return rid

    def close(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(self.buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
def build_plan(rng: random.Random) -> list[dict]:
    """Every page of both snapshots as a dict (snapshot, uri, date, kind, html parts, expected fate)."""
    topics = sorted(bank_ja.TOPICS)
    pages: list[dict] = []
    seen_ngrams: list[set] = []

    def new_article(topic: str) -> dict:
        # redraw until it is far from every earlier article (no accidental near-duplicates) and long enough
        for _ in range(100):
            art = make_article(rng, topic)
            text = article_text(art)
            grams = char_ngrams(text)
            if len(JA_LETTER.findall(text)) >= 450 and all(jaccard(grams, g) < 0.55 for g in seen_ngrams):
                seen_ngrams.append(grams)
                return art
        raise RuntimeError("could not draw a distinct article")

    def sidebar() -> list[str]:
        return [fill(rng.choice(bank_ja.TOPICS[t]["titles"]), rng) for t in rng.sample(topics, 4)]

    def good_page(snapshot, art, host, path, date, kind, family, charset="utf-8"):
        site = bank_ja.TOPICS[art["topic"]]["site"] if host in HOST_OF_TOPIC.values() else host
        return {"snapshot": snapshot, "uri": f"https://{host}{path}", "date": date, "kind": kind,
                "family": family, "charset": charset, "lang": "ja", "title": art["title"], "site": site,
                "paragraphs": ["".join(p) for p in art["paragraphs"]], "sidebar": sidebar(),
                "text": article_text(art), "clean": "keep"}

    snap1, snap2 = SNAPSHOTS
    family = 0
    articles_s1: list[tuple[dict, str, str]] = []
    for si, (snapshot, start) in enumerate(SNAPSHOTS):
        def when(k: int) -> str:
            return (start + timedelta(minutes=37 * k + 11)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tick = 100  # mirror copies of snapshot 1 are crawled with ticks < 100, i.e. before the originals
        for i in range(N_NEW_ARTICLES):
            topic = topics[i % len(topics)]
            art = new_article(topic)
            host = HOST_OF_TOPIC[topic]
            path = f"/{si + 1}/{i:03d}.html"
            charset = "shift_jis" if i < N_SHIFT_JIS else "euc-jp" if i < N_SHIFT_JIS + N_EUC_JP else "utf-8"
            pages.append(good_page(snapshot, art, host, path, when(tick), "good", family, charset))
            if si == 0:
                articles_s1.append((art, host, path))
            family += 1
            tick += 1
        if si == 0:
            # the same article under a second URL in the same crawl: exact duplicates
            for j in range(N_URL_VARIANTS):
                base = next(p for p in pages if p["uri"].endswith(f"/1/{50 + j:03d}.html"))
                dup = dict(base, uri=base["uri"] + "?ref=top", date=when(tick), kind="url_variant")
                pages.append(dup)
                tick += 1
            # a mirror host copies 11 articles (crawled earlier than the originals) and has one page of its own
            for j in range(N_MIRROR_COPIES):
                src = next(p for p in pages if p["uri"].endswith(f"/1/{j * 2:03d}.html"))
                pages.append(dict(src, uri=f"https://{MIRROR_HOST}/copy/{j}.html", date=when(j), kind="mirror_copy",
                                  site="まとめコピー", charset="utf-8"))
            own = new_article("weather")
            pages.append(good_page(snapshot, own, MIRROR_HOST, "/own/0.html", when(N_MIRROR_COPIES), "mirror_own",
                                   family))
            family += 1
        else:
            # re-crawls of snapshot 1 pages (same URL, newer date): unchanged, then lightly edited
            for j in range(N_RECRAWL_SAME + N_RECRAWL_EDITED):
                src = next(p for p in pages if p["snapshot"] == snap1[0] and p["kind"] == "good"
                           and p["uri"].endswith(f"/1/{10 + j:03d}.html"))
                if j < N_RECRAWL_SAME:
                    pages.append(dict(src, snapshot=snapshot, date=when(tick), kind="recrawl_same",
                                      sidebar=sidebar()))
                else:
                    art_src = next(a for a, h, pth in articles_s1 if src["uri"] == f"https://{h}{pth}")
                    art = edit_article(rng, art_src)
                    assert jaccard(char_ngrams(article_text(art)), char_ngrams(src["text"])) > 0.9
                    pages.append(dict(src, snapshot=snapshot, date=when(tick), kind="recrawl_edited",
                                      paragraphs=["".join(p) for p in art["paragraphs"]], text=article_text(art),
                                      sidebar=sidebar()))
                tick += 1
        # pages the recipe must drop
        extra: list[dict] = []
        for j in range(PER_SNAPSHOT["boilerplate"]):
            title, lines = bank_ja.BOILERPLATE_PAGES[(j + si) % len(bank_ja.BOILERPLATE_PAGES)]
            extra.append({"kind": "boilerplate", "uri": f"https://{rng.choice(list(HOST_OF_TOPIC.values()))}"
                                                        f"/info/{si}{j}.html", "title": title, "site": "案内",
                          "paragraphs": lines, "clean": "drop"})
        for j in range(PER_SNAPSHOT["spam"]):
            lines = bank_ja.SPAM_LINES[j % len(bank_ja.SPAM_LINES)]
            body = []
            for k in range(rng.randint(25, 35)):
                body.append(lines[k % len(lines)])
                if k % 5 == 4:
                    body.append(" ".join(rng.choice(bank_ja.SPAM_KEYWORDS) for _ in range(8)))
            extra.append({"kind": "spam", "uri": f"https://kasegu{si}{j}.example.com/lp.html",
                          "title": "【限定】" + lines[0][:12], "site": "特別なお知らせ", "paragraphs": body,
                          "clean": "drop"})
        for j in range(PER_SNAPSHOT["teaser"]):
            lines = rng.sample(bank_ja.TEASER_LINES, len(bank_ja.TEASER_LINES))
            extra.append({"kind": "teaser", "uri": f"https://links{si}{j}.example.net/index.html",
                          "title": "新着記事のまとめ", "site": "新着まとめ", "paragraphs": lines, "clean": "drop"})
        for j in range(PER_SNAPSHOT["katakana"]):
            lines = [f"{rng.choice(bank_ja.KATAKANA_ITEMS)} " + " ".join(rng.sample(bank_ja.KATAKANA_WORDS, 5))
                     + f" {rng.randint(980, 9800)}円" for _ in range(30)]
            extra.append({"kind": "katakana", "uri": f"https://shop{si}{j}.example.com/list.html",
                          "title": "アイテムリスト", "site": "ショップ", "paragraphs": lines, "clean": "drop"})
        for j in range(PER_SNAPSHOT["english"]):
            paras = [make_english_doc(rng, 4, 6)[1] for _ in range(3)]
            extra.append({"kind": "english", "uri": f"https://blog{si}{j}.example.org/post.html",
                          "title": fill(rng.choice(bank_en.PAGE_TITLES), rng), "site": "Notebook",
                          "paragraphs": paras, "lang": "en", "clean": "drop"})
        for j in range(PER_SNAPSHOT["blocked"]):
            art = new_article(topics[(j + 3 * si) % len(topics)])
            host = BLOCKED_HOSTS[j % 2]
            path = f"/test/read.cgi/hobby/{si}{j}/" if host.endswith("5ch.net") else f"/wiki/demo_{si}_{j}"
            page = good_page(snapshot, art, host, path, "", "blocked", family)
            page["clean"] = "drop"
            extra.append(page)
            family += 1
        for j in range(PER_SNAPSHOT["not_html"]):
            extra.append({"kind": "not_html", "uri": f"https://{HOST_OF_TOPIC[topics[j]]}/img/{si}{j}.png",
                          "clean": "drop"})
        for j in range(PER_SNAPSHOT["http_404"]):
            extra.append({"kind": "http_404", "uri": f"https://{HOST_OF_TOPIC[topics[j + 2]]}/old/{si}{j}.html",
                          "clean": "drop"})
        for page in extra:
            page.setdefault("lang", "ja")
            page.setdefault("charset", "utf-8")
            page.setdefault("family", None)
            page.update(snapshot=snapshot, date=when(tick))
            tick += 1
            pages.append(page)
    # expected dedup fate of the kept pages: within a family of identical/near-identical texts the newest page is
    # kept; the mirror host then loses its own page to the host filter (11 of its 12 pages were copies)
    by_family: dict[int, list[dict]] = {}
    for p in pages:
        if p["clean"] == "keep":
            by_family.setdefault(p["family"], []).append(p)
    for members in by_family.values():
        newest = max(members, key=lambda p: (p["date"], p["snapshot"]))
        for p in members:
            p["dedup"] = "keep" if p is newest else "removed_duplicate"
    for p in pages:
        if p.get("kind") == "mirror_own":
            p["dedup"] = "removed_host"
    return pages


def render(page: dict) -> tuple[bytes, str, str]:
    """-> (payload, HTTP content type, HTTP status)."""
    if page["kind"] == "not_html":
        png = b"\x89PNG\r\n\x1a\n" + hashlib.sha256(page["uri"].encode()).digest() * 8
        return png, "image/png", "200 OK"
    if page["kind"] == "http_404":
        html = page_html("ページが見つかりません", "404", ["お探しのページは見つかりませんでした。"])
        return html.encode("utf-8"), "text/html; charset=utf-8", "404 Not Found"
    charset = page["charset"]
    html = page_html(page["title"], page["site"], page["paragraphs"], lang=page["lang"], charset=charset,
                     date=page["date"][:10], sidebar=page.get("sidebar"))
    if charset == "shift_jis":
        return html.encode("cp932"), "text/html; charset=Shift_JIS", "200 OK"
    if charset == "euc-jp":
        return html.encode("euc_jp"), "text/html", "200 OK"  # charset only in <meta>: the decoder's 2nd source
    return html.encode("utf-8"), "text/html; charset=utf-8", "200 OK"


def write_all(out: Path) -> dict:
    rng = random.Random(SEED)
    pages = build_plan(rng)
    manifest_records = []
    for snapshot, start in SNAPSHOTS:
        snap_pages = sorted((p for p in pages if p["snapshot"] == snapshot), key=lambda p: (p["date"], p["uri"]))
        for f in range(FILES_PER_SNAPSHOT):
            name = f"{snapshot}-demo-{f:05d}.warc.gz"
            writer = WarcWriter(out / "warc" / snapshot / name, name)
            writer.warcinfo(start.strftime("%Y-%m-%dT%H:%M:%SZ"), snapshot)
            for page in snap_pages[f::FILES_PER_SNAPSHOT]:
                payload, ctype, status = render(page)
                rid = writer.response(page["uri"], page["date"], payload, ctype, status)
                manifest_records.append({
                    "file": f"warc/{snapshot}/{name}", "snapshot": snapshot, "uri": page["uri"], "record_id": rid,
                    "date": page["date"], "kind": page["kind"], "charset": page["charset"],
                    "clean": page["clean"], "dedup": page.get("dedup"), "family": page["family"]})
            writer.close()
    # small English corpus: base tokenizer training text and the replay blend
    eng_rng = random.Random(SEED + 1)
    lines = []
    for i in range(N_ENGLISH_DOCS):
        topic, text = make_english_doc(eng_rng)
        lines.append(json.dumps({"id": f"en-{i:04d}", "topic": topic, "text": text}, ensure_ascii=False))
    import zstandard

    raw = ("\n".join(lines) + "\n").encode("utf-8")
    (out / "english.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))

    kinds: dict[str, int] = {}
    for r in manifest_records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    clean_kept = sum(r["clean"] == "keep" for r in manifest_records)
    dup_removed = sum(r["dedup"] == "removed_duplicate" for r in manifest_records)
    host_removed = sum(r["dedup"] == "removed_host" for r in manifest_records)
    manifest = {
        "generator": "launch/demo_data/make_demo_data.py", "seed": SEED,
        "expected": {"records": len(manifest_records), "clean_kept": clean_kept, "dedup_removed": dup_removed,
                     "host_removed": host_removed, "final_docs": clean_kept - dup_removed - host_removed,
                     "english_docs": N_ENGLISH_DOCS, "blocked_hosts": BLOCKED_HOSTS, "mirror_host": MIRROR_HOST},
        "kinds": dict(sorted(kinds.items())),
        "records": manifest_records,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE), help="output directory (default: beside this script)")
    args = parser.parse_args(argv)
    manifest = write_all(Path(args.out))
    e = manifest["expected"]
    print(f"wrote {e['records']} WARC records ({manifest['kinds']}); expected: {e['clean_kept']} pages kept by "
          f"clean, {e['dedup_removed']} near-duplicates and {e['host_removed']} host-filtered page(s) removed by "
          f"dedup, {e['final_docs']} final documents; {e['english_docs']} English documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
