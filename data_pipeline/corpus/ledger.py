"""The drop ledger of `hibari corpus clean` and `hibari corpus explain`.

Every WARC response record a shard reads and does not keep gets one line in `OUTPUT/_ledger/<stem>.dropped.jsonl.zst`:
    id, url, snapshot, warc_file, stage, reason, value (the rule's measured value, e.g. `num_letters=262 < 400`)
and, with `--keep-dropped-text`, `text` (the extracted text when the page got that far, else null). So per shard
records read = documents kept + ledger lines (tested), and any loss can be audited. The `_ledger/` folder starts
with `_` so that `corpus dedup` and globs over `OUTPUT/*.jsonl.zst` never take it for corpus shards.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import zstandard

from hibari.errors import HibariError
from hibari.io import atomic_write, read_jsonl

LEDGER_DIR = "_ledger"
LEDGER_SUFFIX = ".dropped.jsonl.zst"


def ledger_path(out_dir: str | Path, stem: str) -> Path:
    return Path(out_dir) / LEDGER_DIR / f"{stem}{LEDGER_SUFFIX}"


class LedgerWriter:
    """Append-only JSONL.zst writer, written atomically (a killed shard leaves no partial ledger)."""

    def __init__(self, path: str | Path, level: int = 3):
        self.path = Path(path)
        self.level = level
        self.count = 0

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = ExitStack()
        raw = self._stack.enter_context(atomic_write(self.path, "wb"))
        self._zf = self._stack.enter_context(zstandard.ZstdCompressor(level=self.level).stream_writer(
            raw, closefd=False))
        return self

    def write(self, entry: dict) -> None:
        self._zf.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self.count += 1

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def explain(out_dir: str | Path, doc_id: str | None = None, url: str | None = None) -> list[dict]:
    """Every fate of the documents with this WARC record id or URL in a clean output: kept (with its shard) or
    dropped (with the ledger entry)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise HibariError(f"{out}: no such directory (expected the --output of `hibari corpus clean`)")
    ledgers = sorted((out / LEDGER_DIR).glob(f"*{LEDGER_SUFFIX}"))
    shards = sorted(out.glob("*.jsonl.zst"))
    if not ledgers and not shards:
        raise HibariError(f"{out}: no corpus shards and no {LEDGER_DIR}/ (is it the output of `corpus clean`?)")

    def match(rec: dict) -> bool:
        return (doc_id is not None and rec.get("id") == doc_id) or (url is not None and rec.get("url") == url)

    fates = []
    for shard in shards:
        for rec in read_jsonl(shard):
            if match(rec):
                fates.append({"fate": "kept", "file": str(shard), "id": rec.get("id"), "url": rec.get("url"),
                              "snapshot": rec.get("snapshot"), "warc_file": rec.get("warc_file"),
                              "characters": len(rec.get("text") or "")})
    for ledger in ledgers:
        for rec in read_jsonl(ledger):
            if match(rec):
                fates.append({"fate": "dropped", "file": str(ledger), **rec})
    return fates


def format_fate(f: dict) -> str:
    where = f"{f.get('warc_file')} ({f.get('snapshot')})"
    if f["fate"] == "kept":
        return f"{f['id']} {f['url']}: kept in {f['file']}, {f['characters']:,} characters; from {where}"
    value = f" ({f['value']})" if f.get("value") else ""
    return f"{f['id']} {f['url']}: dropped at stage {f['stage']}: {f['reason']}{value}; from {where}"


def register_explain(sub) -> None:
    p = sub.add_parser("explain", help="print what happened to a document in a corpus clean output",
                       description="Looks a WARC record up by id or URL in the output of `hibari corpus clean`: "
                                   "kept (in which shard) or dropped (stage, reason, measured value; from the drop "
                                   "ledger in OUTPUT/_ledger/).")
    p.add_argument("output", metavar="OUTPUT", help="the --output directory of `hibari corpus clean`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="doc_id", help="WARC-Record-ID, e.g. '<urn:uuid:...>'")
    which.add_argument("--url", help="WARC-Target-URI of the record")
    p.add_argument("--json", action="store_true", help="one JSON object per fate")
    p.set_defaults(func=_explain)


def _explain(args) -> int:
    fates = explain(args.output, args.doc_id, args.url)
    if not fates:
        what = f"id {args.doc_id}" if args.doc_id else f"url {args.url}"
        raise HibariError(f"{args.output}: no record with {what} was read (not in any shard or drop ledger)")
    for f in fates:
        print(json.dumps(f, ensure_ascii=False) if args.json else format_fate(f))
    return 0
