"""The local runner: tasks on a process pool on this machine, resumably, with clean interrupts.

`run_local(tasks, state_dir, workers, desc, show_progress)` runs every task without a valid done-marker and returns
{task_id: stats} for all tasks (done before or now). A failing task does not stop the others; afterwards the first
failure is raised as one line (`tasks.failure_error`).

Interrupts: Ctrl-C (SIGINT) or SIGTERM stops the run within about a second: queued tasks are cancelled, workers get
SIGTERM (their atomic writes remove their temp files while unwinding) and SIGKILL if they do not exit, temp files of
unfinished tasks are removed, and one line says how many tasks completed (they keep their markers, so the same
command resumes). Workers ignore SIGINT themselves (a terminal sends it to the whole process group; the parent
decides) and watch the parent: if it dies, even by SIGKILL, they stop within a second instead of running on as
orphans.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from hibari.errors import HibariError
from hibari.progress import progress_bar

from data_pipeline.executor.status import record_stage
from data_pipeline.executor.tasks import (Task, check_unique, error_text, failure_error, load_done, remove_temp_files,
                                          run_task, task_done)

_PARENT_POLL_S = 0.5
_TERM_GRACE_S = 1.0


def run_local(tasks: list[Task], state_dir: str | Path, workers: int = 1, desc: str = "tasks",
              show_progress: bool = True) -> dict[str, dict]:
    check_unique(tasks)
    if workers < 1:
        raise HibariError(f"--workers {workers}: expected a positive number")
    record_stage(state_dir, desc, [t.task_id for t in tasks], "local")
    results: dict[str, dict] = {}
    pending: list[Task] = []
    for t in tasks:
        if task_done(state_dir, t):
            results[t.task_id] = load_done(state_dir, t.task_id)
        else:
            pending.append(t)
    failures: list[tuple[Task, str, bool]] = []
    with _stop_on_sigterm(), progress_bar(len(tasks), desc, unit="tasks", enabled=show_progress) as bar:
        bar.advance(len(tasks) - len(pending))
        try:
            if workers <= 1 or len(pending) <= 1:
                for t in pending:
                    try:
                        results[t.task_id] = run_task(t, state_dir)
                    except Exception as err:  # noqa: BLE001 - reported below with the task name
                        failures.append((t, error_text(err), isinstance(err, HibariError)))
                    bar.advance()
            else:
                _run_pool(pending, state_dir, min(workers, len(pending)), results, failures, bar)
        except KeyboardInterrupt:
            remove_temp_files(p for t in pending if t.task_id not in results for p in t.outputs)
            completed = sum(1 for t in tasks if task_done(state_dir, t))  # incl. markers written while stopping
            print(f"hibari: {desc}: {completed} of {len(tasks)} tasks completed before the interrupt (kept: the "
                  "same command resumes with the rest)", file=sys.stderr, flush=True)
            raise
    if failures:
        raise failure_error(failures)
    return {t.task_id: results[t.task_id] for t in tasks}


def _run_pool(pending: list[Task], state_dir, workers: int, results: dict, failures: list, bar) -> None:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    futures = {}
    try:
        futures = {pool.submit(_run_in_worker, t.to_json(), str(state_dir)): t for t in pending}
        not_done = set(futures)
        while not_done:
            # a bounded wait keeps the main thread responsive to signals
            finished, not_done = wait(not_done, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = futures[fut]
                try:
                    results[t.task_id] = fut.result()
                except Exception as err:  # noqa: BLE001 - reported by the caller with the task name
                    failures.append((t, error_text(err), isinstance(err, HibariError)))
                bar.advance()
    except BaseException:
        _terminate(pool, futures)
        raise
    pool.shutdown(wait=True)


def _terminate(pool: ProcessPoolExecutor, futures: dict) -> None:
    """Cancel queued tasks, SIGTERM the workers, SIGKILL those still alive after a grace period."""
    for fut in futures:
        fut.cancel()
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _TERM_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


class _stop_on_sigterm:
    """In the main thread, SIGTERM interrupts the run like Ctrl-C (workers stopped, temp files removed)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------------ workers
class _Terminated(BaseException):
    """Raised in a worker's task by SIGTERM: unwinding removes the task's temp files, then the worker exits."""


_IN_TASK = False


def _worker_init(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_exit)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="hibari-parent-watch").start()


def _run_in_worker(task_data: dict, state_dir: str) -> dict:
    global _IN_TASK
    _IN_TASK = True
    try:
        return run_task(Task.from_json(task_data), state_dir)
    except _Terminated:
        os._exit(128 + signal.SIGTERM)  # unwound (temp files removed); the pool's own loop must not go on
    finally:
        _IN_TASK = False


def _worker_exit(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    if not _IN_TASK:
        os._exit(128 + signum)  # idle: nothing to clean up
    raise _Terminated

def parent_alive(pid: int) -> bool:
    """False once `pid` has exited (also while it is an unreaped zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _watch_parent(parent_pid: int) -> None:
    while parent_alive(parent_pid):
        time.sleep(_PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # the main thread unwinds the running task (temp files removed)
    time.sleep(_TERM_GRACE_S)
    os._exit(1)
