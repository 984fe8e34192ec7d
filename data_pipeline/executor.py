"""Run corpus tasks (one per input shard) on a local process pool, resumably.

A task is a picklable top-level function plus arguments and a stable `task_id`. When a task finishes, its stats
are written atomically to `STATE_DIR/done/<task_id>.json`; a rerun skips tasks with a marker, so a killed job
resumes where it stopped. Task functions must themselves write outputs atomically (see `hibari.io`).
The SLURM array executor (launch/) uses the same markers, so local and SLURM runs are interchangeable.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hibari.io import atomic_write
from hibari.errors import HibariError
from hibari.progress import progress_bar


@dataclass(frozen=True)
class Task:
    task_id: str  # stable across reruns; used as the completion-marker name
    fn: Callable[..., dict]  # returns a JSON-serialisable stats dict
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def marker_path(state_dir: str | Path, task_id: str) -> Path:
    return Path(state_dir) / "done" / f"{task_id}.json"


def is_done(state_dir: str | Path, task_id: str) -> bool:
    return marker_path(state_dir, task_id).is_file()


def mark_done(state_dir: str | Path, task_id: str, stats: dict) -> None:
    path = marker_path(state_dir, task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(stats, f, ensure_ascii=False, sort_keys=True)


def load_done(state_dir: str | Path, task_id: str) -> dict:
    return json.loads(marker_path(state_dir, task_id).read_text(encoding="utf-8"))


def run_task(task: Task, state_dir: str | Path) -> dict:
    """Run one task and write its marker (also the entry point of one SLURM array element)."""
    stats = task.fn(*task.args, **task.kwargs)
    mark_done(state_dir, task.task_id, stats)
    return stats


def run_local(tasks: list[Task], state_dir: str | Path, workers: int = 1, desc: str = "tasks",
              show_progress: bool = True) -> dict[str, dict]:
    """Run all tasks not yet done; return {task_id: stats} for every task (done before or now).

    A failing task does not stop the others; after all ran, the first failure is raised as one line naming the
    task, and rerunning does only the failed/missing ones.
    """
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    results: dict[str, dict] = {}
    pending = []
    for t in tasks:
        if is_done(state_dir, t.task_id):
            results[t.task_id] = load_done(state_dir, t.task_id)
        else:
            pending.append(t)
    failures: list[tuple[str, BaseException]] = []
    with progress_bar(len(tasks), desc, unit="tasks", enabled=show_progress) as bar:
        bar.advance(len(tasks) - len(pending))
        if workers <= 1 or len(pending) <= 1:
            for t in pending:
                try:
                    results[t.task_id] = run_task(t, state_dir)
                except Exception as err:  # noqa: BLE001 - reported below with the task name
                    failures.append((t.task_id, err))
                bar.advance()
        else:
            ctx = mp.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futs = {pool.submit(run_task, t, state_dir): t for t in pending}
                for fut in as_completed(futs):
                    t = futs[fut]
                    try:
                        results[t.task_id] = fut.result()
                    except Exception as err:  # noqa: BLE001
                        failures.append((t.task_id, err))
                    bar.advance()
    if failures:
        tid, err = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        msg = str(err) if isinstance(err, HibariError) else f"{type(err).__name__}: {err}"
        raise HibariError(f"task {tid} failed: {msg}{more}; rerun to retry the failed tasks only")
    return {tid: results[tid] for tid in ids}
