"""Training checkpoints: DCP step directories written atomically, `latest` pointer, keep-last-K, resharding load.

Layout of `<run.dir>/checkpoints/`:
    step_00000100/        one complete checkpoint (a hibari checkpoint: `hibari convert hibari-to-hf` reads it)
        .metadata, *.distcp   DCP: "model.*" (hibari names), "optimizer.*" (FQN-keyed, so any layout reloads it)
        hibari_model.json     architecture (+ the init checkpoint's hf_config), written by rank 0
        train_state.json      step, consumed samples, schedule start, tokens seen (rank 0)
        rng/rank_00003.pt     RNG states of each rank (torch CPU/CUDA, python, numpy): per rank by nature
        config.yaml           the run's resolved config at save time
    latest                a one-line file naming the newest complete step directory; replaced last
    .tmp_step_00000200/   a save in progress (or one that crashed): never read, removed on the next start

A save writes into `.tmp_step_X`, renames it to `step_X` when every rank has finished, then replaces `latest`
(write + os.replace). A crash at any point leaves the previous `latest` and its directory intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from hibari.errors import HibariError

LATEST = "latest"
TRAIN_STATE = "train_state.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def all_ranks_flag(value: bool, op: str = "min") -> bool:
    """A boolean agreed by all ranks (min: all true; max: any true). Identity without a process group."""
    if not _dist_on():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return bool(flag.item())


def barrier() -> None:
    if _dist_on():
        dist.barrier()


def _silence_no_pg_warning():
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


def is_complete(step_dir: Path) -> bool:
    return (step_dir / ".metadata").is_file() and (step_dir / TRAIN_STATE).is_file()


def find_latest(root: str | Path) -> Path | None:
    """The newest complete step directory: the one `latest` names, else the highest complete `step_*`."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(target):
            return target
    steps = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and is_complete(p)), reverse=True)
    return steps[0] if steps else None


def read_train_state(step_dir: str | Path) -> dict:
    path = Path(step_dir) / TRAIN_STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HibariError(f"{path}: unreadable train state ({type(err).__name__})") from None


def checkpoint_keys(step_dir: str | Path) -> set[str]:
    try:
        meta = FileSystemReader(str(step_dir)).read_metadata()
    except FileNotFoundError:
        raise HibariError(f"{step_dir}: DCP metadata (.metadata) not found: incomplete or not a checkpoint") from None
    return set(meta.state_dict_metadata)


# ---- RNG state (per rank) ----

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / "rng" / f"rank_{rank:05d}.pt"


@dataclass
class PendingSave:
    future: object
    step: int
    tmp_dir: Path
    final_dir: Path
    rank0_files: dict = field(default_factory=dict)


class Checkpointer:
    """Saves and loads training checkpoints of one run (every rank holds one; rank 0 does the file moves)."""

    def __init__(self, run_dir: str | Path, engine, optimizer, keep_last: int = 3, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.engine, self.optimizer = engine, optimizer
        self.keep_last, self.async_save = keep_last, async_save
        self.rank = _rank()
        self.pending: PendingSave | None = None
        self._pg = None
        _silence_no_pg_warning()
        if async_save and _dist_on():
            # the background save runs collectives: give it its own gloo group so they never interleave with
            # the training collectives of the main thread
            self._pg = dist.new_group(backend="gloo")

    def clean_stale(self) -> None:
        """Remove half-written saves of a previous (crashed) process. Rank 0, before any save."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def _state(self, with_optimizer: bool) -> dict:
        state = {"model": self.engine.model_state_dict()}
        if with_optimizer:
            state["optimizer"] = self.engine.optimizer_state_dict(self.optimizer)
        return state

    def save(self, step: int, train_state: dict, rank0_files: dict[str, str]) -> Path:
        """Write checkpoint `step`. rank0_files: {file name: text} written into it by rank 0 (model json, config)."""
        self.wait()
        name = step_dir_name(step)
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        torch.save(rng_state(), rng_file(tmp, self.rank))
        files = dict(rank0_files)
        files[TRAIN_STATE] = json.dumps(train_state, indent=2)
        state = self._state(with_optimizer=True)
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self.pending = PendingSave(fut, step, tmp, final, files)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self.pending = PendingSave(None, step, tmp, final, files)
            self._finalize()
        return final

    def poll(self) -> None:
        """Finish an async save whose writes are done (call once per step; cheap)."""
        if self.pending is None or self.pending.future is None:
            return
        # publish only when the write is done everywhere: _finalize has collectives, all ranks must enter it
        if all_ranks_flag(self.pending.future.done(), "min"):
            self._finalize()

    def wait(self) -> None:
        """Block until a pending save is complete and published."""
        if self.pending is not None:
            self._finalize()

    def _finalize(self) -> None:
        p = self.pending
        self.pending = None
        if p.future is not None:
            p.future.result()
        # every rank's data is written before anyone publishes (the DCP metadata alone is written by rank 0)
        barrier()
        if self.rank == 0:
            for fname, text in p.rank0_files.items():
                (p.tmp_dir / fname).write_text(text, encoding="utf-8")
            if p.final_dir.exists():  # an older save of the same step (a rerun that redid it): replace
                shutil.rmtree(p.final_dir)
            os.replace(p.tmp_dir, p.final_dir)
            pointer_tmp = self.root / (TMP_PREFIX + LATEST)
            pointer_tmp.write_text(p.final_dir.name + "\n", encoding="utf-8")
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune()
        barrier()

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob(f"{STEP_PREFIX}*") if p.is_dir())
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, step_dir: str | Path, with_optimizer: bool, with_rng: bool) -> bool:
        """Load model (+ optimizer) from any hibari checkpoint into the current layout; DCP reshards.

        Returns whether this rank's RNG state was restored (False when the checkpoint came from fewer ranks).
        """
        step_dir = Path(step_dir)
        keys = checkpoint_keys(step_dir)
        if with_optimizer and not any(k.startswith("optimizer.") for k in keys):
            raise HibariError(f"{step_dir}: has no optimizer state (a converted model?); set init.load_optimizer: "
                              f"false")
        state = self._state(with_optimizer)
        dcp.load(state, checkpoint_id=str(step_dir))
        self.engine.load_model_state_dict(state["model"])
        if with_optimizer:
            self.engine.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        if with_rng:
            path = rng_file(step_dir, self.rank)
            if path.is_file():
                set_rng_state(torch.load(path, weights_only=True))
                return True
        return False
