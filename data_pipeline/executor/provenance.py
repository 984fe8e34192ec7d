"""What an output was made from, so a rerun never returns or mixes in results of other inputs or settings.

A stage writes a provenance record (absolute input paths with size and mtime, the resolved config, tokenizer
fingerprint, digests of models and word lists, ...) when it starts. A rerun into the same output compares: equal ->
resume / nothing to do; different -> one-line error naming what changed, unless `--overwrite`, in which case the
stage removes exactly the files the earlier run recorded and starts over. `check_output` is the entry point of a
stage (it also refuses an output that holds results but no record); `corpus clean`, `corpus dedup`, `corpus
annotate`, `corpus export` and `data tokenize` all use these functions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hibari.errors import HibariError
from hibari.io import write_json

from data_pipeline.executor.tasks import read_marker


def file_identity(path: str | Path) -> dict:
    """Absolute path (as named: a symlink stays the link), size and mtime of an input file (a changed file is a
    different input)."""
    p = Path(path).absolute()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_identity(src) -> dict:
    """A `data_pipeline.readers.DocumentSource`'s identity: its label (file + row groups), size and mtime."""
    st = Path(src.path).stat() if Path(src.path).exists() else None
    return {"path": src.label, "size": st.st_size if st else src.size, "mtime_ns": st.st_mtime_ns if st else 0}


def resource_digests(paths) -> dict[str, str | None]:
    """{absolute path: sha256 of the file, or of the files directly in the directory} for small resources a stage
    reads (a classifier model, NG word lists): another model or list at the same path is a change."""
    out = {}
    for path in paths:
        p = Path(path).absolute()
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else []
        out[str(p)] = files_digest(files) if files else None
    return out


def files_digest(paths) -> str:
    """sha256 over the names and bytes of small files (e.g. a tokenizer directory's files)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _input_changes(old: list, new: list) -> list[str]:
    def key(x):
        return x["path"] if isinstance(x, dict) else str(x)

    old_by, new_by = {key(x): x for x in old}, {key(x): x for x in new}
    changes = [f"input {Path(p).name} added" for p in new_by if p not in old_by]
    changes += [f"input {Path(p).name} removed" for p in old_by if p not in new_by]
    changes += [f"input {Path(p).name} modified (size/mtime)" for p in new_by
                if p in old_by and new_by[p] != old_by[p]]
    if not changes and [key(x) for x in old] != [key(x) for x in new]:
        changes.append("input order")
    return changes


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two provenance records ('inputs' lists of file identities or paths,
    nested dicts compared key by key)."""
    changes: list[str] = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if name == "inputs" and isinstance(a, list) and isinstance(b, list):
            changes += _input_changes(a, b)
        elif isinstance(a, dict) and isinstance(b, dict):
            fa, fb = _flatten(a), _flatten(b)
            changes += [f"{name} {k}: {_short(fa.get(k))} -> {_short(fb.get(k))}"
                        for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
        else:
            changes.append(f"{name}: {_short(a)} -> {_short(b)}")
    return changes


def refuse_changed(output: str, changes: list[str]) -> HibariError:
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    return HibariError(f"{output} holds results of a different run ({shown}); use --overwrite to replace them, or "
                       "another output")


def check_provenance(record_path: Path, current: dict, output: str, overwrite: bool,
                     ignore: tuple[str, ...] = ("outputs",), field: str | None = None) -> dict | None:
    """Compare `current` with the record at `record_path` (or its `field`, e.g. a summary's "provenance"; keys in
    `ignore`, e.g. the list of files the run makes, are not compared). Returns the old record when it differs and
    `overwrite` is set (the caller removes the old run's files), None when there is nothing to remove. Raises when
    it differs without `overwrite`. A record that cannot be read counts as a different run."""
    if not record_path.exists():
        return None
    old = read_marker(record_path)
    if old is not None and field is not None:
        old = old.get(field) if isinstance(old.get(field), dict) else None
    if old is None:
        changes = [f"its record {record_path.name} is unreadable" + (f" or has no {field!r}" if field else "")]
        old = {}
    else:
        changes = describe_changes({k: v for k, v in old.items() if k not in ignore},
                                   {k: v for k, v in current.items() if k not in ignore})
    if not changes:
        return None
    if not overwrite:
        raise refuse_changed(output, changes)
    return old


def check_output(record_path: Path, current: dict, output: str, overwrite: bool, has_results: bool,
                 ignore: tuple[str, ...] = ("outputs",), field: str | None = None) -> dict | None:
    """`check_provenance`, plus: an output that holds results (`has_results`) but no record (another tool or an
    older hibari) is refused the same way unless `overwrite` (then `{}` is returned: nothing recorded to remove)."""
    if not Path(record_path).exists() and has_results:
        if not overwrite:
            raise HibariError(f"{output}: holds results without a record of their inputs and config (another tool or "
                              "an older hibari); use --overwrite to replace them, or another output")
        return {}
    return check_provenance(Path(record_path), current, output, overwrite, ignore, field)


def write_provenance(record_path: Path, current: dict) -> None:
    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record_path, current, indent=1, sort_keys=True)
