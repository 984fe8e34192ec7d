"""Document inputs of every data command: one resolver (`resolve_inputs`) and one reader (`iter_records` /
`iter_texts`) for JSONL(.zst/.gz), plain text, parquet, arrow files and `datasets.save_to_disk` directories.

Formats (by name): `*.jsonl[.zst|.gz]` one JSON object per line; `*.txt[.zst|.gz]` one document per line (blank
lines are not documents) or one per file (`text_format="file"`); `*.parquet` streamed by row group with pyarrow
(only the needed columns are read); `*.arrow` Arrow IPC file or stream (the format `datasets` caches and saves);
a directory written by `Dataset.save_to_disk` (has `state.json`) or `DatasetDict.save_to_disk` (has
`dataset_dict.json`; pick the split with `split=`). Any other directory is searched recursively for the formats
above, skipping names that begin with `_` or `.` (stage state, ledgers and reports live there).

Work units: one `DocumentSource` per file, except parquet files larger than `max_task_bytes`, which become one
source per range of row groups; a source's `key` is unique and stable (task ids, output names, resumption).

Bad input is always a one-line `HibariError` naming the file: a truncated or corrupt compressed/parquet/arrow file
(never read as a short complete one), invalid UTF-8 or JSON (with the line number), a missing text column. Nothing
downloads: a name that looks like a Hugging Face Hub dataset is an error saying to download it first. `datasets`
itself is not needed (arrow files are read with pyarrow directly).
"""

from __future__ import annotations

import glob
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from hibari.errors import HibariError
from hibari.io import decode_line, iter_lines, read_json_object, read_jsonl, read_jsonl_field

TEXT_FORMATS = ("line", "file")
_KINDS = {".jsonl": "jsonl", ".jsonl.zst": "jsonl", ".jsonl.gz": "jsonl", ".txt": "txt", ".txt.zst": "txt",
          ".txt.gz": "txt", ".parquet": "parquet", ".arrow": "arrow"}
FORMATS_HELP = ("JSONL[.zst|.gz], .txt[.zst|.gz], .parquet, .arrow files/globs, or a datasets.save_to_disk "
                "directory")
DEFAULT_TASK_BYTES = 256 << 20  # parquet files above this are split into row-group ranges of about this size
_BATCH_ROWS = 1024  # rows per arrow batch: bounds memory whatever the row-group size
_ARROW_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # IPC end-of-stream marker (a cut stream lacks it)
_HUB_NAME = re.compile(r"^(hf://)?(datasets/)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class DocumentSource:
    """One unit of reading work: a whole file, or a range [start, stop) of a parquet file's row groups."""
    path: str  # absolute
    kind: str  # jsonl | txt | parquet | arrow
    key: str  # unique relative name, e.g. "CC-MAIN-2024-10/00000.jsonl.zst" or "train/data-00000-of-00002.arrow"
    size: int = 0  # bytes (progress accounting)
    row_groups: tuple[int, int] | None = None
    text_format: str = "line"

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """The file, plus the row-group range when only a part of it is read (for messages and stats)."""
        if self.row_groups is None:
            return self.path
        return f"{self.path} (row groups {self.row_groups[0]}-{self.row_groups[1] - 1})"

    @property
    def stem(self) -> str:
        """`key` without its format suffix, plus the row-group range: unique, the name of outputs derived from it."""
        stem = _strip_suffix(self.key)
        if self.row_groups is not None:
            stem += f".rg{self.row_groups[0]:05d}-{self.row_groups[1] - 1:05d}"
        return stem

    def to_dict(self) -> dict:
        d = asdict(self)
        d["row_groups"] = list(self.row_groups) if self.row_groups else None
        return d


def as_source(value: "DocumentSource | dict | str | Path", text_format: str = "line") -> DocumentSource:
    """Accept a source, its `to_dict()` (manifests) or a plain file path (a whole file)."""
    if isinstance(value, DocumentSource):
        return value
    if isinstance(value, dict):
        rg = value.get("row_groups")
        return DocumentSource(**{**value, "row_groups": tuple(rg) if rg else None})
    path = Path(value)
    return DocumentSource(str(path.resolve()), _kind_of(path, explicit=True), path.name,
                          path.stat().st_size if path.is_file() else 0, None, text_format)


def _strip_suffix(name: str) -> str:
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _kind_of(path: Path, explicit: bool) -> str | None:
    name = path.name
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return _KINDS[suffix]
    if explicit:
        raise HibariError(f"input {path}: unsupported format (expected {FORMATS_HELP})")
    return None


# --------------------------------------------------------------------------------------------- resolving inputs
def resolve_inputs(inputs: str | list[str], *, split: str | None = None, text_format: str = "line",
                   max_task_bytes: int | None = None) -> list[DocumentSource]:
    """Expand paths, globs and directories into document sources, in argument order (sorted within each).
    Every problem is reported before any work starts; two inputs with the same key are an error naming both."""
    if text_format not in TEXT_FORMATS:
        raise HibariError(f"--text-format {text_format!r}: expected one of {', '.join(TEXT_FORMATS)}")
    max_task_bytes = DEFAULT_TASK_BYTES if max_task_bytes is None else max_task_bytes
    patterns = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not patterns:
        raise HibariError("--input: no input given")
    sources: list[DocumentSource] = []
    for pat in patterns:
        pat = str(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else ([pat] if Path(pat).exists()
                                                                                         else [])
        if not matches:
            if _HUB_NAME.match(pat) and not Path(pat).parent.exists():
                raise HibariError(f"input {pat!r}: no such file; it looks like a Hugging Face Hub dataset name, and "
                                  f"hibari never downloads: download it first (e.g. `huggingface-cli download {pat} "
                                  f"--repo-type dataset --local-dir DIR`, or "
                                  f"`datasets.load_dataset(...).save_to_disk(DIR)`) and pass the local files or DIR")
            raise HibariError(f"input {pat!r}: no such file or directory (expected {FORMATS_HELP})")
        for m in matches:
            path = Path(m)
            if path.is_dir():
                sources.extend(_sources_in_dir(path, split, text_format, max_task_bytes))
            elif glob.has_magic(pat) and _kind_of(path, explicit=False) is None:
                continue  # a glob may also match unrelated files (reports, markers)
            else:
                sources.extend(_file_sources(path, path.name, text_format, max_task_bytes))
    if not sources:
        raise HibariError(f"input {patterns!r}: no documents found (expected {FORMATS_HELP})")
    seen: dict[str, str] = {}
    for s in sources:
        if s.stem in seen:
            raise HibariError(f"inputs {seen[s.stem]} and {s.label}: both map to the name {s.stem!r} (task id / "
                              f"output name); rename one or pass their parent directory")
        seen[s.stem] = s.label
    return sources


def _sources_in_dir(root: Path, split: str | None, text_format: str, max_task_bytes: int) -> list[DocumentSource]:
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return _saved_dataset_sources(root, split)
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(("_", ".")) for part in rel.parts):
            continue
        if _kind_of(p, explicit=False) is not None:
            found.extend(_file_sources(p, rel.as_posix(), text_format, max_task_bytes))
    if not found:
        raise HibariError(f"input {root}: directory without documents (expected {FORMATS_HELP} inside, or a "
                          f"datasets.save_to_disk directory)")
    return found


def _saved_dataset_sources(root: Path, split: str | None) -> list[DocumentSource]:
    """The arrow files of a `save_to_disk` directory, read from its own manifest (no `datasets` import)."""
    if (root / "dataset_dict.json").is_file():
        splits = read_json_object(root / "dataset_dict.json", "save_to_disk manifest").get("splits") or []
        if split is None:
            if len(splits) != 1:
                raise HibariError(f"input {root}: a DatasetDict with splits {', '.join(splits)}; choose one with "
                                  f"--split")
            split = splits[0]
        if split not in splits:
            raise HibariError(f"--split {split!r}: not in {root} (splits: {', '.join(splits)})")
        return [DocumentSource(s.path, s.kind, f"{root.name}/{s.key}", s.size)
                for s in _saved_dataset_sources(root / split, None)]
    state = read_json_object(root / "state.json", "save_to_disk manifest")
    files = [f.get("filename") for f in state.get("_data_files") or []]
    if not files or not all(isinstance(f, str) for f in files):
        raise HibariError(f"{root / 'state.json'}: no '_data_files' list (expected a datasets.save_to_disk dir)")
    if state.get("_indices_data_files"):
        raise HibariError(f"{root}: saved with an indices mapping; save it again after `flatten_indices()`")
    sources = []
    for name in files:
        p = root / name
        if not p.is_file():
            raise HibariError(f"{root}: data file {name} listed in state.json is missing")
        sources.append(DocumentSource(str(p.resolve()), "arrow", f"{root.name}/{name}", p.stat().st_size))
    return sources


def _file_sources(path: Path, key: str, text_format: str, max_task_bytes: int) -> list[DocumentSource]:
    kind = _kind_of(path, explicit=True)
    size = path.stat().st_size
    base = DocumentSource(str(path.resolve()), kind, key, size, None, text_format)
    if kind == "parquet":
        meta = _parquet_file(path).metadata  # validates the footer now: a cut file fails before any work
        if size > max_task_bytes and meta.num_row_groups > 1:
            return [DocumentSource(base.path, kind, key, nbytes, (a, b))
                    for a, b, nbytes in _row_group_ranges(meta, max_task_bytes)]
    elif kind == "arrow":
        _open_arrow(path)  # validates the header / end marker now
    return [base]


def _row_group_ranges(meta, max_task_bytes: int) -> list[tuple[int, int, int]]:
    ranges, start, acc = [], 0, 0
    for i in range(meta.num_row_groups):
        nbytes = meta.row_group(i).total_byte_size
        if i > start and acc + nbytes > max_task_bytes:
            ranges.append((start, i, acc))
            start, acc = i, 0
        acc += nbytes
    ranges.append((start, meta.num_row_groups, acc))
    return ranges


# --------------------------------------------------------------------------------------------- reading
def iter_records(source, text_key: str = "text", columns: list[str] | None = None) -> Iterator[dict]:
    """Records of one source as dicts. Text files give `{text_key: text}`; parquet/arrow read only `columns` when
    given (the ones present), dates/timestamps as ISO strings."""
    src = as_source(source)
    if src.kind == "jsonl":
        yield from read_jsonl(src.path)
    elif src.kind == "txt":
        for text in _iter_txt(src):
            yield {text_key: text}
    else:
        for batch in _iter_batches(src, columns):
            yield from _plain_columns(batch).to_pylist()


def iter_texts(source, text_key: str = "text") -> Iterator[object]:
    """The `text_key` value of every record, in order (None when a record lacks it): the fast path of the
    tokenizers, which read only that column of parquet/arrow inputs. A columnar input without the column is an
    error naming the file and its columns."""
    src = as_source(source)
    if src.kind == "jsonl":
        yield from read_jsonl_field(src.path, text_key)
    elif src.kind == "txt":
        yield from _iter_txt(src)
    else:
        for batch in _iter_batches(src, [text_key], require=text_key):
            yield from batch.column(0).to_pylist()


def _iter_txt(src: DocumentSource) -> Iterator[str]:
    path = Path(src.path)
    if src.text_format == "file":
        lines = [decode_line(path, n, raw) for n, raw in iter_lines(path)]
        text = "\n".join(lines)
        if text.strip():
            yield text
        return
    for lineno, raw in iter_lines(path):
        if raw.strip():
            yield decode_line(path, lineno, raw)


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise HibariError(f"{path}: not a readable parquet file (truncated or corrupt: {_one_line(err)})") from None


def _open_arrow(path: Path):
    """(reader, is_stream) of an Arrow IPC file or stream, memory-mapped (batches are read lazily)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_file(source), False
        except pa.ArrowInvalid:
            source.seek(0)
        with open(path, "rb") as fh:  # a stream written to the end closes with the end-of-stream marker
            fh.seek(max(0, path.stat().st_size - len(_ARROW_STREAM_END)))
            if fh.read() != _ARROW_STREAM_END:
                raise HibariError(f"{path}: truncated arrow stream: no end-of-stream marker at byte "
                                  f"{path.stat().st_size} (copy or save it again)")
        return pa.ipc.open_stream(source), True
    except (pa.ArrowException, OSError) as err:
        raise HibariError(f"{path}: not a readable arrow file (truncated or corrupt: {_one_line(err)})") from None


def _iter_batches(src: DocumentSource, columns: list[str] | None, require: str | None = None):
    import pyarrow as pa

    path = Path(src.path)
    try:
        if src.kind == "parquet":
            pf = _parquet_file(path)
            names = pf.schema_arrow.names
            _check_column(path, names, require)
            cols = [c for c in columns if c in names] if columns is not None else None
            groups = list(range(*src.row_groups)) if src.row_groups else None
            batches = pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=cols, use_threads=False)
        else:
            reader, is_stream = _open_arrow(path)
            names = reader.schema.names
            _check_column(path, names, require)
            batches = iter(reader) if is_stream else (reader.get_batch(i) for i in range(reader.num_record_batches))
            if columns is not None:
                keep = [c for c in columns if c in names]
                batches = (b.select(keep) for b in batches)
        for batch in batches:
            if batch.num_rows > _BATCH_ROWS:  # arrow files carry the writer's batch size; bound it here
                for off in range(0, batch.num_rows, _BATCH_ROWS):
                    yield batch.slice(off, _BATCH_ROWS)
            else:
                yield batch
    except (pa.ArrowException, OSError) as err:
        raise HibariError(f"{src.label}: corrupt {src.kind} data ({_one_line(err)})") from None


def _check_column(path: Path, names: list[str], column: str | None) -> None:
    if column is not None and column not in names:
        raise HibariError(f"{path}: no column {column!r} (columns: {', '.join(names)}); choose one with --text-key")


def _plain_columns(batch):
    """Dates and timestamps as ISO strings, so records stay JSON-serialisable like JSONL ones."""
    import pyarrow as pa

    cols = []
    for col in batch.columns:
        if pa.types.is_temporal(col.type):
            col = col.cast(pa.string())
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


# --------------------------------------------------------------------------------------------- CLI arguments
def add_input_arguments(parser, *, input: bool = True, text_key: bool = True, text_format: bool = True,
                        split: bool = True, help: str | None = None) -> None:
    """The input options every document-reading command shares (same names, same meaning everywhere)."""
    if input:
        parser.add_argument("--input", required=True, nargs="+", action="extend", metavar="PATH",
                            help=help or f"{FORMATS_HELP}; several paths/globs, repeatable")
    if text_key:
        parser.add_argument("--text-key", default="text",
                            help="JSON key / parquet or arrow column holding the document text (default: text)")
    if text_format:
        parser.add_argument("--text-format", choices=TEXT_FORMATS, default="line",
                            help=".txt inputs: one document per line (blank lines skipped) or one per file")
    if split:
        parser.add_argument("--split", default=None,
                            help="split of a DatasetDict save_to_disk directory (needed when it has several)")
