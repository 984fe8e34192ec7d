"""File I/O every package shares: atomic writes, JSON and JSONL(.zst/.gz) files checked to the end, input globs,
output dirs."""

from __future__ import annotations

import glob as _glob
import gzip
import io
import json
import os
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import zstandard

from hibari.errors import HibariError


def expand_inputs(pattern: str | list[str]) -> list[Path]:
    """Sorted files matching a glob (or list of globs/paths). Missing input is an error before any work starts."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(_glob.glob(pat, recursive=True))
        if not matches:
            raise HibariError(f"input {pat!r}: no such file (expected a file path or glob matching files)")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    if not files:
        raise HibariError(f"input {patterns!r}: matched only directories, expected files")
    return files


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check it is writable, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HibariError(f"output dir {path}: cannot create ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HibariError(f"output dir {path}: not writable")
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Write to `path.tmp-<pid>` and rename on success: readers never see a partial file, a crash leaves none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(out_dir: str | Path):
    """Yield a hidden sibling directory to write into; it replaces `out_dir` only when the block succeeds. On any
    failure (bad input found midway, full disk, Ctrl-C) the staging directory is removed and `out_dir` is left as it
    was: no half-written output, an --overwrite target still intact. The caller decides whether replacing is allowed."""
    out = Path(out_dir)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


_READ_CHUNK = 1 << 16  # compressed bytes per read: bounds what one decompress call can produce


class _ZstdFrameReader(io.RawIOBase):
    """Decompress a (multi-frame) zstd file and fail loudly when the last frame is unfinished or data is corrupt.

    `zstandard`'s stream_reader returns a short, "complete"-looking result for a file cut inside a frame; here every
    frame must reach its end mark, so truncation is an error naming the file and the byte offset where it ends."""

    def __init__(self, path: Path):
        self._path = path
        self._fh = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read (None between frames)
        self._offset = 0  # compressed bytes consumed so far
        self._pending = b""
        self._pending_pos = 0
        self._at_end = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._fh.close()
        super().close()

    def _decompress_next(self) -> bytes | None:
        """Decompressed bytes of the next compressed chunk (b"" when it completed no output), None at the end."""
        chunk = self._fh.read(_READ_CHUNK)
        if not chunk:
            self._at_end = True
            if self._offset == 0:
                raise HibariError(f"{self._path}: empty file, not a zstd stream (truncated at byte 0)")
            if self._frame is not None:
                raise HibariError(f"{self._path}: truncated zstd file: it ends at byte {self._offset} inside an "
                                  f"unfinished frame (copy or download it again)")
            return None
        out, data = [], chunk
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except zstandard.ZstdError as err:
                raise HibariError(f"{self._path}: corrupt zstd data near byte {self._offset} ({err})") from None
            if self._frame.eof:  # frame complete; what follows belongs to the next frame
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""
        self._offset += len(chunk)
        return out[0] if len(out) == 1 else b"".join(out)

    def chunks(self) -> Iterator[bytes]:
        """The decompressed stream in the pieces the decompressor produces (no copies through a read buffer)."""
        if self._pending_pos < len(self._pending):
            yield self._pending[self._pending_pos:]
        self._pending, self._pending_pos = b"", 0
        while not self._at_end:
            data = self._decompress_next()
            if data:
                yield data

    def readinto(self, buf) -> int:
        while self._pending_pos >= len(self._pending) and not self._at_end:
            self._pending, self._pending_pos = self._decompress_next() or b"", 0
        start = self._pending_pos
        n = min(len(buf), len(self._pending) - start)
        buf[:n] = memoryview(self._pending)[start:start + n]  # an offset, not a slice copy of the rest
        self._pending_pos = start + n
        return n


def open_binary(path: str | Path):
    """Open a plain, .zst or .gz file for binary reading, decompressed; compressed streams are checked to the end."""
    path = Path(path)
    try:
        if path.name.endswith(".zst"):
            return io.BufferedReader(_ZstdFrameReader(path), 1 << 20)
        if path.name.endswith(".gz"):
            if path.stat().st_size == 0:
                raise HibariError(f"{path}: empty file, not a gzip stream (truncated at byte 0)")
            return gzip.open(path, "rb")
        return open(path, "rb")
    except FileNotFoundError:
        raise HibariError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise HibariError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise HibariError(f"{path}: permission denied") from None


_BLOCK = 1 << 22  # decompressed bytes per read of plain/.gz files; lines are split a block at a time


def _data_chunks(f) -> Iterator[bytes]:
    """Decompressed contents of a file opened by `open_binary`, in large pieces."""
    raw = getattr(f, "raw", None)
    if isinstance(raw, _ZstdFrameReader):
        yield from raw.chunks()
        return
    while chunk := f.read(_BLOCK):
        yield chunk


def _line_lists(path: Path) -> Iterator[tuple[int, list[bytes], bool]]:
    """(lines before these, raw lines, whether the last one ends the file without a newline): the decompressed file
    split a large piece at a time, without copying the pieces. A truncated or corrupt compressed stream is a
    HibariError naming the file."""
    lineno = 0
    with open_binary(path) as f:
        try:
            rest = b""
            for chunk in _data_chunks(f):
                lines = chunk.split(b"\n")
                if rest:
                    lines[0] = rest + lines[0]
                rest = lines.pop()  # the unfinished line continues in the next piece
                if lines:
                    yield lineno, lines, False
                    lineno += len(lines)
            if rest:
                yield lineno, [rest], True
        except EOFError:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
            raise HibariError(f"{path}: truncated gzip file: it ends at byte {path.stat().st_size} inside an "
                              f"unfinished member (after line {lineno}; copy or download it again)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as err:
            raise HibariError(f"{path}: corrupt compressed data after line {lineno} "
                              f"({type(err).__name__}: {err})") from None


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line without the newline) of a plain/.zst/.gz file. A truncated or corrupt compressed
    stream is a HibariError naming the file and byte offset, never a short read that looks complete."""
    path = Path(path)
    for lineno, lines, tail in _line_lists(path):
        if tail:  # last line without a newline: kept as it is
            yield lineno + 1, lines[0]
            continue
        for lineno, line in enumerate(lines, lineno + 1):
            yield lineno, line.rstrip(b"\r")


def decode_line(path: Path, lineno: int, raw: bytes) -> str:
    """UTF-8 text of one line; invalid UTF-8 is an error naming file, line and byte (never a raw traceback)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HibariError(f"{path}:{lineno}: invalid UTF-8 at byte {err.start} of the line "
                          f"(expected UTF-8 text)") from None


def _parse_json_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        rec = json.loads(decode_line(path, lineno, raw))
    except json.JSONDecodeError as err:
        raise HibariError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise HibariError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise HibariError(f"{path}:{lineno}: expected a JSON object per line")
    return rec


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield records of a JSONL / JSONL.zst / JSONL.gz file. Bad input is an error naming the file and line (bad
    JSON, invalid UTF-8, a non-object line) or the byte offset (truncated/corrupt compression): never a short read."""
    path = Path(path)
    for lineno, raw in iter_lines(path):
        if raw.strip():
            yield _parse_json_line(path, lineno, raw)


def read_jsonl_field(path: str | Path, key: str) -> Iterator[object]:
    """`rec.get(key)` of every record of `read_jsonl(path)`, with the same checks and errors. A line that is exactly
    `{"KEY": "..."}` (json.dumps' spacing) has its string scanned directly, skipping the dict (about twice as fast
    as json.loads); any other line is parsed in full."""
    path = Path(path)
    head = json.dumps({key: ""}, ensure_ascii=False)[:-2]  # '{"text": "'
    start = len(head)
    head_bytes = head.encode("utf-8")
    scan = json.decoder.scanstring
    for lineno, lines, tail in _line_lists(path):
        for lineno, raw in enumerate(lines, lineno + 1):
            if not tail:
                raw = raw.rstrip(b"\r")
            if raw.startswith(head_bytes):
                line = decode_line(path, lineno, raw)
                try:
                    value, end = scan(line, start)  # strict, as json.loads
                except json.JSONDecodeError:
                    value, end = None, -1  # parsed in full below, for the error message
                if end > 0 and line[end:].strip(_JSON_SPACE) == "}":
                    yield value
                    continue
            elif not raw.strip():
                continue
            yield _parse_json_line(path, lineno, raw).get(key)


_JSON_SPACE = " \t\n\r"  # the whitespace JSON allows between tokens


def write_jsonl(path: str | Path, records: Iterable[dict], level: int = 3) -> int:
    """Atomically write records as JSONL (zstd-compressed if the name ends in .zst). Returns the record count."""
    path = Path(path)
    n = 0
    with atomic_write(path, "wb") as raw:
        if path.name.endswith(".zst"):
            cctx = zstandard.ZstdCompressor(level=level)
            with cctx.stream_writer(raw, closefd=False) as zf:
                for rec in records:
                    zf.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                    n += 1
        else:
            for rec in records:
                raw.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
    return n


def write_json(path: str | Path, data, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """Atomically write one JSON document (temp file + rename): the project's one JSON writer for state/report files."""
    with atomic_write(path, "wb") as f:
        f.write(json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=sort_keys).encode("utf-8"))


def read_json_object(path: str | Path, what: str, error: type[HibariError] = HibariError) -> dict:
    """One JSON object file (state, metadata, model files): the project's one checked JSON reader. Missing,
    unreadable, invalid UTF-8/JSON or not an object is a one-line `error` naming the file and `what` it should hold."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: unreadable {what} (invalid JSON at line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{path}: unreadable {what} ({getattr(err, 'strerror', None) or type(err).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: unreadable {what} (expected a JSON object)")
    return data
