"""How a rank stops: signals and the death of its parent.

- SIGUSR1 (SLURM `--signal=USR1@T`) and SIGTERM (scancel, a launcher forwarding a stop): finish the current step,
  save a checkpoint, exit 0.
- SIGINT (Ctrl-C): the first one does the same and the CLI reports `hibari: interrupted, saved step N` (exit 130);
  a second one stops at once (no checkpoint; the last saved one stays valid).
- Parent gone: a rank started by a launcher (LOCAL_RANK / TORCHELASTIC_RUN_ID set) asks Linux to kill it when its
  parent dies (prctl PR_SET_PDEATHSIG), so no rank outlives `hibari launch`, even after `kill -9` of it.
Signals reach ranks at different times; `agreed()` max-reduces the request so every rank stops after the same step.
"""

from __future__ import annotations

import os
import signal
import sys

# stop reasons, ordered: when ranks disagree the highest wins
NONE, PREEMPT, INTERRUPT = 0, 1, 2
_SIGNALS = {signal.SIGUSR1: PREEMPT, signal.SIGTERM: PREEMPT, signal.SIGINT: INTERRUPT}
_PR_SET_PDEATHSIG = 1


class StopSignals:
    """Installs the handlers (main thread only) and remembers which stop was requested."""

    def __init__(self, announce: bool = True):
        self.reason = NONE
        self.signal_name: str | None = None
        self.announce = announce
        self._old: dict = {}

    def install(self) -> "StopSignals":
        for sig in _SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test calling train() from a worker thread)
                break
        return self

    def _handler(self, signum, frame):
        reason = _SIGNALS[signum]
        if reason == INTERRUPT and self.reason == INTERRUPT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if reason >= self.reason:
            self.reason, self.signal_name = reason, signal.Signals(signum).name
        if self.announce and reason == INTERRUPT:
            print("hibari: interrupt: saving a checkpoint after this step (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def agreed(self) -> int:
        """The stop reason every rank agrees on (max over ranks); NONE to continue."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.reason
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor([self.reason], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def launched_by_parent(env=os.environ) -> bool:
    """Whether this process is a rank a launcher started (and must not outlive). HIBARI_PARENT_WATCH=0/1 forces."""
    forced = env.get("HIBARI_PARENT_WATCH")
    if forced in ("0", "1"):
        return forced == "1"
    return "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env


def die_with_parent(env=os.environ) -> bool:
    """Linux: SIGKILL this process when its parent exits. Returns whether the watch is armed.

    SIGKILL, not SIGTERM: a rank whose launcher is gone may be blocked in a collective with a dead peer, where a
    graceful stop would never run. Its last complete checkpoint stays valid.
    """
    if not sys.platform.startswith("linux") or not launched_by_parent(env):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before the watch was armed
        os._exit(1)
    return True
