"""The task / done-marker contract shared by every runner (local process pool, SLURM array).

A task is DATA: a stable `task_id`, the import path of a top-level function (`"package.module:function"`) and
JSON-able arguments. Runners ship tasks to workers and array elements as JSON, never as pickled callables, so a task
list on disk is readable and nothing a file controls is unpickled.

When a task finishes, `STATE_DIR/done/<task_id>.json` is written atomically:
    {"task_id": ..., "fingerprint": ..., "stats": <the function's JSON result>}
A rerun skips a task only if its marker parses, and (when the task has a `fingerprint`, e.g. its input file's
size and mtime) the recorded fingerprint is the same: a corrupt or stale marker means "not done" and the task runs
again. Task functions write their outputs atomically (`hibari.io.atomic_write`); the temp files of a killed run
(`.<name>.tmp-<pid>`) are removed before a task runs again, and after an interrupt.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hibari.errors import HibariError
from hibari.io import write_json

DONE_DIR = "done"
FAILED_DIR = "failed"


def function_path(fn: Callable | str) -> str:
    """`module:qualname` of an importable top-level function (or the string itself, checked for the form)."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise TypeError(f"task function {fn!r}: expected 'package.module:function'")
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise TypeError(f"task function {qualname or fn!r}: must be a top-level function of an importable module "
                        "(tasks are data: a function path and JSON arguments)")
    return f"{module}:{qualname}"


def resolve_function(path: str) -> Callable[..., dict]:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _json_check(value, what: str, task_id: str):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"task {task_id}: {what} must be JSON data ({err})") from None
    return value


@dataclass(frozen=True)
class Task:
    task_id: str  # stable across reruns: the marker name
    fn: str  # "package.module:function" (a callable is accepted and converted)
    args: tuple = ()  # JSON-able positional arguments (sent as a JSON list: tuples arrive as lists)
    kwargs: dict = field(default_factory=dict)  # JSON-able keyword arguments
    label: str = ""  # what the task works on (e.g. its input file): named in error messages
    fingerprint: Any = None  # JSON; a marker recorded with another fingerprint is stale (task redone)
    outputs: tuple = ()  # files the task writes atomically: their stale temp files are removed before it runs

    def __post_init__(self):
        if not isinstance(self.task_id, str) or not self.task_id or "/" in self.task_id:
            raise TypeError(f"task id {self.task_id!r}: expected a non-empty string without '/'")
        object.__setattr__(self, "fn", function_path(self.fn))
        object.__setattr__(self, "args", tuple(_json_check(list(self.args), "args", self.task_id)))
        _json_check(self.kwargs, "kwargs", self.task_id)
        _json_check(self.fingerprint, "fingerprint", self.task_id)
        object.__setattr__(self, "outputs", tuple(str(p) for p in self.outputs))

    @property
    def name(self) -> str:
        return self.label or self.task_id

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "fn": self.fn, "args": list(self.args), "kwargs": self.kwargs,
                "label": self.label, "fingerprint": self.fingerprint, "outputs": list(self.outputs)}

    @classmethod
    def from_json(cls, data: dict) -> "Task":
        return cls(task_id=data["task_id"], fn=data["fn"], args=tuple(data.get("args", ())),
                   kwargs=data.get("kwargs", {}), label=data.get("label", ""), fingerprint=data.get("fingerprint"),
                   outputs=tuple(data.get("outputs", ())))


def check_unique(tasks: list[Task]) -> None:
    """Two tasks with one id would share a marker (and usually an output): a one-line error naming both."""
    seen: dict[str, Task] = {}
    for t in tasks:
        other = seen.get(t.task_id)
        if other is not None:
            raise HibariError(f"{other.name} and {t.name} map to the same task id {t.task_id!r} (and the same "
                              "output); rename one of them")
        seen[t.task_id] = t


# ------------------------------------------------------------------------------------------------------ markers
def marker_path(state_dir: str | Path, task_id: str) -> Path:
    return Path(state_dir) / DONE_DIR / f"{task_id}.json"


def failed_path(state_dir: str | Path, task_id: str) -> Path:
    return Path(state_dir) / FAILED_DIR / f"{task_id}.json"


def read_marker(path: str | Path) -> dict | None:
    """The marker's content, or None when it is missing or corrupt (not JSON, not an object)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(state_dir: str | Path, task_id: str, fingerprint: Any = None) -> bool:
    marker = read_marker(marker_path(state_dir, task_id))
    if marker is None or not isinstance(marker.get("stats"), dict):
        return False
    return fingerprint is None or marker.get("fingerprint") == fingerprint


def task_done(state_dir: str | Path, task: Task) -> bool:
    return is_done(state_dir, task.task_id, task.fingerprint)


def mark_done(state_dir: str | Path, task_id: str, stats: dict, fingerprint: Any = None) -> None:
    path = marker_path(state_dir, task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"task_id": task_id, "fingerprint": fingerprint, "stats": stats}, sort_keys=True)


def load_done(state_dir: str | Path, task_id: str) -> dict:
    marker = read_marker(marker_path(state_dir, task_id))
    if marker is None or not isinstance(marker.get("stats"), dict):
        raise HibariError(f"{marker_path(state_dir, task_id)}: missing or corrupt completion marker")
    return marker["stats"]


def remove_temp_files(paths) -> int:
    """Remove `.<name>.tmp-*` left next to each path by an interrupted atomic write; returns how many."""
    n = 0
    for p in paths:
        p = Path(p)
        if p.parent.is_dir():
            for stale in p.parent.glob(f".{p.name}.tmp-*"):
                stale.unlink(missing_ok=True)
                n += 1
    return n


def run_task(task: Task, state_dir: str | Path) -> dict:
    """Run one task and write its marker (in a pool worker, an array element or the calling process)."""
    remove_temp_files(task.outputs)
    stats = resolve_function(task.fn)(*task.args, **task.kwargs)
    if not isinstance(stats, dict):
        raise TypeError(f"task {task.task_id}: {task.fn} returned {type(stats).__name__}, expected a dict of stats")
    failed_path(state_dir, task.task_id).unlink(missing_ok=True)
    mark_done(state_dir, task.task_id, stats, task.fingerprint)
    return stats


# ------------------------------------------------------------------------------------------------------ failures
def error_text(err: BaseException) -> str:
    return str(err) if isinstance(err, HibariError) else f"{type(err).__name__}: {err}"


def failure_error(failures: list[tuple[Task, str, bool]], where: str = "") -> HibariError:
    """The one failure message of every runner. failures: (task, message, is_input_error) in completion order.

    An input error (a HibariError: its message names the file and what is wrong) gets no "rerun" hint: a rerun
    cannot fix it. Anything else may be transient, so the message says that completed tasks are kept."""
    task, msg, input_error = failures[0]
    more = f" (and {len(failures) - 1} more task{'s' if len(failures) > 2 else ''} failed)" if len(failures) > 1 \
        else ""
    hint = "" if input_error else "; completed tasks are kept and the same command redoes only the failed ones"
    return HibariError(f"task {task.name} failed{where}: {msg}{more}{hint}")
