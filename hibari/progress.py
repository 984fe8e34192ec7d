"""The project's one progress display: a rich progress bar with rate and ETA.

Use `progress_bar(total, desc, unit)` as a context manager; call `.advance(n)` per unit of work. It prints nothing
when `enabled=False` (non-zero ranks, quiet mode) and falls back to periodic one-line updates when stderr is not a
terminal (CI logs, SLURM output files), so long jobs still show rate and ETA in log files.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s")


class _Bar:
    def __init__(self, progress, task_id, total, desc, unit, log_every_s: float, initial: float = 0):
        self._progress, self._task, self.total, self.desc, self.unit = progress, task_id, total, desc, unit
        self.done = self._initial = initial
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._log_every_s = log_every_s
        self.postfix = ""

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._progress is not None:
            self._progress.update(self._task, postfix=text)

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)
        elif self._log_every_s > 0:
            now = time.perf_counter()
            if now - self._last_log >= self._log_every_s:
                self._last_log = now
                self._log_line()

    def _log_line(self) -> None:
        rate = self.rate
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {max(self.total - self.done, 0) / rate:.0f}s"
        total = f"/{self.total:g}" if self.total else ""
        print(f"[{self.desc}] {self.done:g}{total} {self.unit} {rate:.1f} {self.unit}/s{eta} {self.postfix}".rstrip(),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is None and self._log_every_s > 0:
            self._log_line()


@contextmanager
def progress_bar(total: float | None, desc: str, unit: str = "it", enabled: bool = True, log_every_s: float = 10.0,
                 initial: float = 0):
    """initial: work already done before this process (a resumed run shows 13/20, its rate counts only new work)."""
    if not enabled:
        bar = _Bar(None, None, total, desc, unit, log_every_s=0, initial=initial)
        yield bar
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        bar = _Bar(None, None, total, desc, unit, log_every_s=log_every_s, initial=initial)
        try:
            yield bar
        finally:
            bar.close()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _RateColumn(unit), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[postfix]}")]
    with Progress(*columns, console=console, transient=False) as prog:
        task_id = prog.add_task(desc, total=total, postfix="", completed=initial)
        bar = _Bar(prog, task_id, total, desc, unit, log_every_s=0, initial=initial)
        yield bar
