"""`hibari launch local`: N training processes on this machine under the torch elastic agent (what torchrun uses).

The agent sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for each `hibari train` process,
watches them, and when one dies (crash, OOM kill, `kill -9`) stops the others and reports which rank failed; we
turn that report into one line and a non-zero exit. No restarts: a rerun of the same command resumes from
`<run.dir>/checkpoints/latest`.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid

from hibari.errors import HibariError


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


def launch_local(nproc: int, config: str, overrides: list[str], monitor_interval: float = 0.5) -> None:
    """Run `hibari train CONFIG OVERRIDES` in `nproc` processes; raise LaunchFailed naming the first failed rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise HibariError(f"--nproc {nproc}: expected a positive number of processes")
    # torchrun's default: one thread per process unless the user chose; N processes x all cores would thrash
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"hibari-{uuid.uuid4().hex[:8]}",
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                       monitor_interval=monitor_interval, start_method="spawn")
    try:
        elastic_launch(cfg, entrypoint=sys.executable)(*worker_command(config, overrides))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        others = sorted(r for r in err.failures if r != rank)
        also = f"; also failed: rank(s) {', '.join(map(str, others))}" if others else ""
        raise LaunchFailed(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) "
                           f"{describe_exit(failure.exitcode)}; the other ranks were stopped{also}; rerun the same "
                           f"command to resume from the latest checkpoint", rank, failure.exitcode) from None
