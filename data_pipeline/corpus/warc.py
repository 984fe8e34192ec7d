"""WARC reading, HTTP parsing and charset decoding for the cleaning pipeline.

fastwarc reads the WARC records, but we parse the HTTP header block ourselves: fastwarc 2.0.1 looks only for
`\\r\\n\\r\\n`, so on WARCs whose HTTP headers end with a bare `\\n\\n` (the real ClueWeb09-ja sample) it reads ~10 KB
of HTML into the headers and silently loses that payload. We take the first blank line of either style.
"""

from __future__ import annotations

import codecs
import io
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

_RE_SNAPSHOT = re.compile(r"CC-MAIN-\d{4}-\d{2}")
_RE_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
_RE_HEADER_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
# legacy Japanese labels -> the Python codec that decodes what browsers accept under that label
_CHARSET_ALIASES = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932",
    "windows-31j": "cp932", "csshiftjis": "cp932", "x-euc-jp": "euc_jp", "euc-jp": "euc_jp",
    "iso-2022-jp": "iso2022_jp_ext",
}
FALLBACK_CHARSETS = ("utf-8", "cp932", "euc_jp", "shift_jis_2004", "euc_jis_2004")


@dataclass
class Page:
    """One document on its way through the pipeline; steps fill in later fields."""
    id: str
    url: str
    host: str
    date: str
    snapshot: str
    warc_file: str
    status: int = 0
    content_type: str = ""
    http_headers: dict = field(default_factory=dict)
    body: bytes = b""
    html: str = ""
    charset: str = ""
    text: str = ""
    drop: tuple | None = None  # (stage, reason, measured value) once a step dropped the page

    def size(self) -> int:
        """Characters of the current representation (text after extraction, HTML after decoding, else bytes)."""
        if self.text:
            return len(self.text)
        if self.html:
            return len(self.html)
        return len(self.body)

    def record(self) -> dict:
        """The corpus record schema of `data_pipeline.corpus`."""
        return {"id": self.id, "text": self.text, "url": self.url, "host": self.host, "date": self.date,
                "snapshot": self.snapshot, "warc_file": self.warc_file}


_RE_BAD_HOST_CHAR = re.compile(r"[\s\x00-\x1f\x7f<>\"'{}|\\^`%,;/?#@\[\]()!$&*+=~]")


def host_of(url: str) -> str:
    """Lower-cased host of an http(s) URL, or "" when the URL is not usable (`bad_url`): another scheme (`dns:`),
    no host, a host with spaces or other characters hosts cannot have, an empty label (`..`, `.a`), a label over 63
    or a host over 253 characters."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        return ""
    if parts.scheme.lower() not in ("http", "https"):
        return ""
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]  # the root label: `example.jp.` is `example.jp`
    if not host or len(host) > 253 or _RE_BAD_HOST_CHAR.search(host):
        return ""
    if ":" not in host and any(not label or len(label) > 63 for label in host.split(".")):  # ":": IPv6 literal
        return ""
    return host


def iso_date(value: str) -> str:
    """WARC-Date as ISO-8601, or "" when missing/invalid (e.g. ClueWeb's `2008-10-294T05:21:46-0700`)."""
    value = (value or "").strip()
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return ""


def snapshot_from(warcinfo: str, file_name: str) -> str:
    for source in (warcinfo, file_name):
        m = _RE_SNAPSHOT.search(source or "")
        if m:
            return m.group(0)
    for line in (warcinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "ispartof" and value.strip():
            return value.strip()
    return "unknown"


def split_http(block: bytes) -> tuple[int, dict, bytes] | None:
    """(status, lower-cased headers, payload) of an HTTP response block; None if it is not one.

    The header block ends at the first empty line, `\\r\\n\\r\\n` or bare `\\n\\n`, whichever comes first."""
    if not block.startswith(b"HTTP/"):
        return None
    crlf = block.find(b"\r\n\r\n")
    lf = block.find(b"\n\n")
    ends = [(pos, 4) for pos in (crlf,) if pos >= 0] + [(pos, 2) for pos in (lf,) if pos >= 0]
    if not ends:
        head, payload = block, b""
    else:
        pos, length = min(ends)
        head, payload = block[:pos], block[pos + length:]
    lines = head.decode("iso-8859-1").splitlines()
    parts = lines[0].split(None, 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return status, headers, payload


def dechunk(payload: bytes) -> bytes | None:
    """Decode HTTP chunked transfer encoding; None if the payload is not validly chunked."""
    out, pos = [], 0
    while True:
        eol = payload.find(b"\n", pos)
        if eol < 0:
            return None
        size_txt = payload[pos:eol].split(b";")[0].strip()
        try:
            size = int(size_txt, 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(out)
        start = eol + 1
        out.append(payload[start:start + size])
        pos = start + size
        if payload[pos:pos + 2] == b"\r\n":
            pos += 2
        elif payload[pos:pos + 1] == b"\n":
            pos += 1


def _inflate_capped(payload: bytes, wbits: int, max_bytes: int) -> bytes | None:
    """zlib/gzip/raw-deflate decompression that never produces more than `max_bytes` (+1) bytes: None when the
    output would be larger (a decompression bomb stops here, memory bounded); ValueError-free: a corrupt stream
    raises zlib.error for the caller."""
    out, total, data = [], 0, payload
    while data:
        d = zlib.decompressobj(wbits)
        chunk = d.decompress(data, max_bytes + 1 - total)
        total += len(chunk)
        out.append(chunk)
        if total > max_bytes or d.unconsumed_tail:
            return None
        if not d.eof:
            break  # truncated stream: keep what decoded
        data = d.unused_data if wbits == 31 and d.unused_data[:2] == b"\x1f\x8b" else b""  # next gzip member
    return b"".join(out)


def _unzstd_capped(payload: bytes, max_bytes: int) -> bytes | None:
    import zstandard

    out, total = [], 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=True) as r:
        while True:
            chunk = r.read(min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                return b"".join(out)
            out.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                return None


def content_decode(payload: bytes, headers: dict, max_bytes: int = 4_000_000) -> bytes | None:
    """Undo chunking / gzip / deflate / zstd when the stored payload really is encoded (crawlers often store decoded
    bodies but keep the original headers, e.g. ClueWeb09's `Content-Encoding: gzip`). Decompression stops at
    `max_bytes`: None means the decoded body is larger (counted as `huge_page`). A corrupt encoded body is kept as
    stored (later steps decide)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        dechunked = dechunk(payload)
        if dechunked is not None:
            payload = dechunked
    encoding = headers.get("content-encoding", "").lower()
    try:
        if "gzip" in encoding and payload[:2] == b"\x1f\x8b":
            return _inflate_capped(payload, 31, max_bytes)
        if "deflate" in encoding:
            try:
                return _inflate_capped(payload, zlib.MAX_WBITS, max_bytes)
            except zlib.error:
                return _inflate_capped(payload, -zlib.MAX_WBITS, max_bytes)
        if "zstd" in encoding and payload[:4] == b"\x28\xb5\x2f\xfd":
            return _unzstd_capped(payload, max_bytes)
    except Exception:  # noqa: BLE001 - zlib.error / ZstdError: a corrupt body is kept as stored
        return payload
    return payload


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    label = label.strip().lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_html(body: bytes, content_type: str) -> tuple[str, str] | None:
    """(html, codec): BOM, then the HTTP header charset, then `<meta charset>`, then UTF-8 / CP932 / EUC-JP
    (and the JIS X 0213 variants). Strict decoding: a candidate that fails is skipped. None if all fail."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                      (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            try:
                return body.decode(name), name
            except UnicodeDecodeError:
                break
    candidates = []
    m = _RE_HEADER_CHARSET.search(content_type or "")
    candidates.append(_codec(m.group(1)) if m else None)
    m = _RE_META_CHARSET.search(body[:8192])
    candidates.append(_codec(m.group(1).decode("ascii", "ignore")) if m else None)
    candidates.extend(codecs.lookup(c).name for c in FALLBACK_CHARSETS)
    seen = set()
    for name in candidates:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            return body.decode(name), name
        except (UnicodeDecodeError, LookupError):
            continue
    return None


@dataclass
class SkippedRecord:
    """A response record the reader counted and did not yield (for the drop ledger)."""
    record_id: str
    url: str
    date: str
    reason: str  # huge_page | truncated_record | damaged_record
    value: str


@dataclass
class WarcResponse:
    """A WARC response record before any filtering (`block` = HTTP header + payload)."""
    record_id: str
    url: str
    date: str
    block: bytes
    declared_length: int


def iter_warc(path: Path, stats: dict, max_block_bytes: int, on_progress=None
              ) -> Iterator[WarcResponse | SkippedRecord | str]:
    """Yield response records, `SkippedRecord`s, or the string "warcinfo:<text>" for warcinfo records (snapshot).

    Problems are counted in `stats` and never raised: a corrupt header or truncated gzip stream ends the file
    (`read_error`, message in `read_error_message`; a record it cut is `damaged_record`); a record shorter than its
    Content-Length is `truncated_record`; a block above `max_block_bytes` is `huge_page` (not read into memory).
    Every response record counted in `stats["records"]` is yielded once, as a response or as a SkippedRecord.
    `on_progress(bytes_read)` is called per record with the position in the (compressed) file."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    try:
        stream = open(path, "rb")
    except OSError as err:
        stats["read_error"] = stats.get("read_error", 0) + 1
        stats["read_error_message"] = f"{type(err).__name__}: {err}"
        return
    with stream:
        try:
            records = ArchiveIterator(stream, parse_http=False,
                                      record_types=WarcRecordType.response | WarcRecordType.warcinfo)
            for rec in records:
                if on_progress is not None:
                    on_progress(stream.tell())
                if rec.record_type == WarcRecordType.warcinfo:
                    yield "warcinfo:" + rec.reader.read(65536).decode("utf-8", "replace")
                    continue
                stats["records"] = stats.get("records", 0) + 1
                rid = rec.headers.get("WARC-Record-ID", "") or ""
                url = (rec.headers.get("WARC-Target-URI", "") or "").strip("<> ")
                date = rec.headers.get("WARC-Date", "") or ""
                declared = rec.content_length
                if declared > max_block_bytes:
                    stats["huge_page"] = stats.get("huge_page", 0) + 1
                    yield SkippedRecord(rid, url, date, "huge_page",
                                        f"content_length={declared} > {max_block_bytes} (read.max_page_bytes + headers)")
                    continue
                try:
                    block = rec.reader.read()
                except Exception as err:  # noqa: BLE001 - the stream broke inside this record
                    stats["damaged_record"] = stats.get("damaged_record", 0) + 1
                    yield SkippedRecord(rid, url, date, "damaged_record", f"{type(err).__name__}: {err}"[:200])
                    raise
                if len(block) < declared:
                    stats["truncated_record"] = stats.get("truncated_record", 0) + 1
                    yield SkippedRecord(rid, url, date, "truncated_record",
                                        f"read {len(block)} of content_length={declared} bytes")
                    continue
                yield WarcResponse(record_id=rid, url=url, date=date, block=block, declared_length=declared)
        except Exception as err:  # noqa: BLE001 - fastwarc raises OSError/ValueError on damaged files
            stats["read_error"] = stats.get("read_error", 0) + 1
            stats["read_error_message"] = f"{type(err).__name__}: {err}"
