"""File I/O every package shares: atomic writes, JSON and JSONL / JSONL.zst files, input globs, output dirs."""

from __future__ import annotations

import glob as _glob
import io
import json
import os
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


def _open_text_read(path: Path):
    if path.name.endswith(".zst"):
        fh = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield records of a JSONL or JSONL.zst file. A malformed line is an error naming file and line."""
    path = Path(path)
    with _open_text_read(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise HibariError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise HibariError(f"{path}:{lineno}: expected a JSON object per line")
            yield rec


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
