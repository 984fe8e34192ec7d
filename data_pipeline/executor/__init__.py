"""The one executor of data_pipeline: resumable tasks on a local process pool or a SLURM array.

    tasks.py     the task / done-marker contract (tasks are data: function path + JSON arguments), failure messages
    local.py     run_local: process pool with clean interrupts and no orphan workers
    slurm.py     run_slurm: SLURM array jobs (in-job entry: `python -m data_pipeline.executor.slurm element ...`)
    status.py    `hibari corpus status`: done / failed / pending per stage
    options.py   `--executor local|slurm` and `--slurm-*` options -> `make_runner(args)`
    provenance.py  what an output was made from; reruns with other inputs/config are refused unless --overwrite

A runner is any callable `runner(tasks, state_dir, workers=1, desc="tasks", show_progress=True) -> {id: stats}`;
stage functions take it as `runner=` (default `run_local`).
"""

from data_pipeline.executor.local import run_local
from data_pipeline.executor.tasks import (Task, failure_error, is_done, load_done, mark_done, marker_path, run_task,
                                          task_done)

__all__ = ["Task", "run_local", "run_task", "is_done", "task_done", "load_done", "mark_done", "marker_path",
           "failure_error", "make_runner", "add_executor_arguments"]


def __getattr__(name):  # the SLURM runner and CLI options load on use (`-m ...executor.slurm` must not pre-import)
    if name in ("make_runner", "add_executor_arguments"):
        from data_pipeline.executor import options
        return getattr(options, name)
    raise AttributeError(name)
