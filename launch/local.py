"""`hibari launch local`: N `hibari train` processes (ranks) on this machine, supervised by this process.

Why not torch's elastic agent: it forwards no SIGUSR1 (the launcher died and the ranks trained on as orphans), logs
its own lines around every failure, and cannot say which rank failed first. This supervisor is small:
- rendezvous: the launcher hosts the c10d TCPStore on a port the OS picks (no free-port race) and the ranks join it
  as clients (`TORCHELASTIC_USE_AGENT_STORE`, the agent's own protocol), with RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT set as torchrun sets them;
- signals: SIGUSR1 and SIGTERM are forwarded to every rank as SIGUSR1 (save a checkpoint at the end of the step,
  stop, exit 0: the SLURM preemption semantics); the first Ctrl-C does the same and ends with `hibari: interrupted,
  saved step N`, a second one stops every rank at once; SIGHUP / SIGQUIT stop every rank at once. Ranks run in their
  own session, so a terminal's Ctrl-C reaches only the launcher, which decides;
- no orphans: each rank asks the kernel for SIGKILL when its parent, the launcher, dies (PR_SET_PDEATHSIG, armed by
  the training loop: `megatron_ext.train.signals.die_with_parent`), so even `kill -9` of the launcher ends every rank;
- failures: a rank that fails stops the job; the other ranks are killed at once (their "connection closed by peer"
  errors are consequences, not news). The failed rank's one-line error (it writes it to a file the launcher gave
  it) is printed once, then one line from the launcher. No restarts: rerunning the same command resumes from
  `<run.dir>/checkpoints/latest`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hibari.errors import HibariError
from launch.cli import RANK_ERROR_FILE_ENV

POLL_SECONDS = 0.05
RESEND_STOP_SECONDS = 1.0  # a rank ignores SIGUSR1 until its training loop listens: repeat the request until it stops
EXIT_INTERRUPTED = 130


class LaunchFailed(HibariError):
    """A rank of a launched job failed. `rank` is the global rank that failed first."""

    def __init__(self, message: str, rank: int, exitcode: int):
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def worker_command(config: str, overrides: list[str]) -> list[str]:
    """Arguments after the python executable for one rank."""
    return ["-m", "launch.cli", "train", config, *overrides]


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen
    error_file: Path

    def error_line(self) -> str | None:
        try:
            text = self.error_file.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return text.splitlines()[0] if text else None

    def error_time(self) -> float:
        try:
            return self.error_file.stat().st_mtime
        except OSError:
            return float("inf")


def first_failed(dead: list[Rank]) -> Rank:
    """Of ranks found failed in the same poll, the one that failed first. A rank killed by a signal was killed from
    outside (OOM killer, kill -9; the launcher has not killed anyone yet): the others broke on the lost peer. Then
    the earliest one-line error."""
    return min(dead, key=lambda r: (r.proc.returncode >= 0, r.error_time(), r.rank))


def saved_step(run_dir: str | Path | None) -> int | None:
    """The step of the run's newest complete checkpoint (None: there is none)."""
    if run_dir is None:
        return None
    from megatron_ext.checkpoint import find_latest, read_train_state

    latest = find_latest(Path(run_dir) / "checkpoints")
    return None if latest is None else int(read_train_state(latest)["step"])


class _Signals:
    """Signals to the launcher, recorded by the handler and acted on by the supervision loop."""

    HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self):
        self.pending: list[int] = []
        self._old: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.HANDLED:
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.pending.append(signum)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def take(self) -> list[int]:
        taken, self.pending[:] = list(self.pending), []
        return taken


def _rank_env(nproc: int, rank: int, port: int, error_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TORCHELASTIC_USE_AGENT_STORE="True", PYTHONUNBUFFERED="1")
    env[RANK_ERROR_FILE_ENV] = str(error_file)
    # torchrun's default: one thread per process unless the user chose; N processes x all cores would thrash
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _start_ranks(nproc: int, config: str, overrides: list[str], port: int, tmp: Path) -> list[Rank]:
    ranks = []
    # a rank starts with SIGUSR1 ignored (the disposition survives exec) until its training loop listens for it
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        for r in range(nproc):
            error_file = tmp / f"rank-{r}.error"
            proc = subprocess.Popen([sys.executable, *worker_command(config, overrides)],
                                    env=_rank_env(nproc, r, port, error_file), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            ranks.append(Rank(r, proc, error_file))
    finally:
        signal.signal(signal.SIGUSR1, old)
    return ranks


def _signal_all(ranks: list[Rank], sig: int) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            try:
                r.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _kill_all(ranks: list[Rank]) -> None:
    _signal_all(ranks, signal.SIGKILL)
    for r in ranks:
        r.proc.wait()


def launch_local(nproc: int, config: str, overrides: list[str], run_dir: str | Path | None = None) -> int:
    """Run `hibari train CONFIG OVERRIDES` as `nproc` ranks and supervise them (see the module docstring).

    Returns the exit status (0: finished, or stopped with a checkpoint on SIGUSR1/SIGTERM; 130: interrupted);
    raises LaunchFailed naming the rank that failed first."""
    if nproc < 1:
        raise HibariError(f"--nproc {nproc}: expected a positive number of processes")
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
    tmp = Path(tempfile.mkdtemp(prefix="hibari-launch-"))
    signals = _Signals()
    signals.install()
    ranks: list[Rank] = []
    try:
        ranks = _start_ranks(nproc, config, overrides, store.port, tmp)
        return _supervise(ranks, signals, run_dir)
    finally:
        if any(r.proc.poll() is None for r in ranks):  # an unexpected error in the launcher itself
            _kill_all(ranks)
        signals.uninstall()
        shutil.rmtree(tmp, ignore_errors=True)
        del store


def _supervise(ranks: list[Rank], signals: _Signals, run_dir) -> int:
    stop_requested_at: float | None = None
    interrupted = False
    while True:
        for sig in signals.take():
            if sig in (signal.SIGHUP, signal.SIGQUIT) or (sig == signal.SIGINT and interrupted):
                _kill_all(ranks)
                what = "interrupted again" if sig == signal.SIGINT else signal.Signals(sig).name
                print(f"hibari: {what}: stopped every rank without saving; rerunning the same command resumes from "
                      f"the latest checkpoint", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED if sig == signal.SIGINT else 128 + sig
            if sig == signal.SIGINT:
                interrupted = True
            if stop_requested_at is None:
                how = "interrupt" if sig == signal.SIGINT else signal.Signals(sig).name
                again = " (Ctrl-C again: stop at once without saving)" if sig == signal.SIGINT else ""
                print(f"hibari: {how}: every rank saves a checkpoint at the end of its step and stops{again}",
                      file=sys.stderr, flush=True)
                stop_requested_at = 0.0
        if stop_requested_at is not None and time.monotonic() - stop_requested_at >= RESEND_STOP_SECONDS:
            _signal_all(ranks, signal.SIGUSR1)
            stop_requested_at = time.monotonic()

        failed = [r for r in ranks if r.proc.poll() not in (None, 0)]
        if failed:
            _fail(ranks, first_failed(failed))
        if all(r.proc.returncode is not None for r in ranks):
            break
        time.sleep(POLL_SECONDS)

    if not interrupted:
        return 0
    step = saved_step(run_dir)
    if step is None:
        print("hibari: interrupted before the first checkpoint: nothing saved", file=sys.stderr, flush=True)
    else:
        print(f"hibari: interrupted, saved step {step}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _fail(ranks: list[Rank], first: Rank) -> None:
    _kill_all([r for r in ranks if r is not first])
    code = first.proc.returncode
    error = first.error_line()
    if error:
        print(error, file=sys.stderr, flush=True)
    others = [str(r.rank) for r in ranks if r is not first]
    stopped = f"; the other ranks ({', '.join(others)}) were stopped" if others else ""
    if code == 2:  # a one-line error about the input (config, data, checkpoint): rerunning changes nothing
        why = "; the error above" if error else ""
        raise LaunchFailed(f"rank {first.rank} (pid {first.proc.pid}) {describe_exit(code)}{why}{stopped}",
                           first.rank, code)
    raise LaunchFailed(f"rank {first.rank} (pid {first.proc.pid}) {describe_exit(code)}{stopped}; rerun the same "
                       f"command to resume from the latest checkpoint", first.rank, code)
