"""Training checkpoints of one run: step directories written atomically, `latest`, keep-last-K, resharding load.

The files of a step directory are described in `megatron_ext.checkpoint.format`. A save writes into
`.tmp_step_X`, renames it to `step_X` when every rank has finished, then replaces `latest` (write + os.replace);
a crash at any point leaves the previous `latest` and its directory intact, and a failed save (full disk, I/O
error) is one line naming the file, with the torn directory removed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from hibari.errors import HibariError
from hibari.io import read_json_object
from megatron_ext.checkpoint import (EXTRA_STATE_DIR, LATEST, OPTIMIZER_PREFIX, RNG_DIR, TMP_PREFIX,
                                     TRAIN_STATE, async_save_state, describe_failure, list_steps, load_state,
                                     merge_extra, rank_file, read_checked_index, split_state, step_dir_name)
from megatron_ext.checkpoint.storage import silence_no_pg_warning


class CheckpointError(HibariError):
    """Saving or loading a checkpoint failed (I/O, damaged files): one line naming the file."""


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def all_ranks_flag(value: bool, op: str = "min", group=None) -> bool:
    """A boolean agreed by all ranks (min: all true; max: any true). Identity without a process group."""
    if not _dist_on():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def barrier() -> None:
    if _dist_on():
        dist.barrier()


# Rank-0-only file work (index cache builds, checkpoint renames and pruning) can take far longer than a collective
# timeout allows on a slow shared file system; the other ranks wait for it in a gloo group with this timeout, on the
# CPU: no NCCL watchdog, no GPU sync.
FILE_WORK_TIMEOUT = timedelta(hours=6)
_file_group: tuple = (None, None)  # (the default group it was made for, the gloo group)


def file_work_group():
    """The gloo group for waiting on file work (None without a process group). Made on first use: every rank must
    reach its first use together (the trainer's first `file_barrier`, in setup)."""
    global _file_group
    if not _dist_on():
        return None
    world = dist.group.WORLD
    if _file_group[0] is not world:  # a new process group (tests start several in one process)
        _file_group = (world, dist.new_group(backend="gloo", timeout=FILE_WORK_TIMEOUT))
    return _file_group[1]


def file_barrier() -> None:
    """Wait for rank-0 file work: a barrier in the gloo file-work group (see FILE_WORK_TIMEOUT)."""
    if _dist_on():
        dist.barrier(group=file_work_group())


def file_flag(value: bool) -> bool:
    """`all_ranks_flag(value, "min")` in the file-work group: agreed on the CPU, never a GPU sync."""
    return all_ranks_flag(value, "min", group=file_work_group())


# ---- RNG state (per rank), as JSON: no pickle anywhere in a checkpoint ----

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict, source: Path) -> None:
    try:
        torch.set_rng_state(_from_b64(state["torch"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_from_b64(state["cuda"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: bad RNG state ({type(err).__name__})") from None


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(data))


def _flat_keys(state: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in state.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def _drop_keys(state: dict, drop: set[str], prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _drop_keys(v, drop, f"{prefix}{k}.")
        elif f"{prefix}{k}" not in drop:
            out[k] = v
    return out


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
        self._stager = None
        silence_no_pg_warning()
        if async_save and _dist_on():
            # the background save runs collectives: give it its own gloo group so they never interleave with
            # the training collectives of the main thread
            self._pg = dist.new_group(backend="gloo")
        if async_save:
            self._stager = async_stager(engine.device)

    def clean_stale(self) -> None:
        """Remove half-written saves of a previous (crashed) process. Rank 0, before any save."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(f"{TMP_PREFIX}*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        file_barrier()

    def _state(self, with_optimizer: bool) -> dict:
        state = {"model": self.engine.model_state_dict()}
        if with_optimizer:
            state["optimizer"] = self.engine.optimizer_state_dict(self.optimizer)
        return state

    def _failed(self, step: int, tmp: Path, err: BaseException) -> CheckpointError:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = (self.root / LATEST).read_text(encoding="utf-8").strip() if (self.root / LATEST).is_file() \
            else None
        kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was written yet"
        return CheckpointError(f"saving checkpoint step {step} failed: {describe_failure(err)}; {kept}")

    def save(self, step: int, train_state: dict, rank0_files: dict[str, str]) -> Path:
        """Write checkpoint `step`. rank0_files: {file name: text} written into it by rank 0 (model json, config)."""
        self.wait()
        name = step_dir_name(step)
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        error = None
        try:
            if self.rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = err
        file_barrier()
        state = self._state(with_optimizer=True)
        tensors, extra = split_state(state)
        try:
            if error is None:
                _write_json(rank_file(tmp, RNG_DIR, self.rank), rng_state())
                _write_json(rank_file(tmp, EXTRA_STATE_DIR, self.rank), extra)
        except OSError as err:
            error = err
        # every rank enters DCP's collectives only when every rank could write its own files
        if not file_flag(error is None):
            raise self._failed(step, tmp, error or OSError("another rank failed to write its checkpoint files"))
        files = dict(rank0_files)
        files[TRAIN_STATE] = json.dumps(train_state, indent=2)
        try:
            if self.async_save:
                fut = async_save_state(tensors, tmp, process_group=self._pg, async_stager=self._stager)
                self.pending = PendingSave(fut, step, tmp, final, files)
            else:
                from megatron_ext.checkpoint import save_state

                save_state(tensors, tmp)
                self.pending = PendingSave(None, step, tmp, final, files)
        except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
            raise self._failed(step, tmp, err) from None
        if not self.async_save:
            self._finalize()
        return final

    def poll(self) -> None:
        """Finish an async save whose writes are done (call once per step; cheap)."""
        if self.pending is None or self.pending.future is None:
            return
        # publish only when the write is done everywhere: _finalize has collectives, all ranks must enter it
        if file_flag(self.pending.future.done()):
            self._finalize()

    def wait(self) -> None:
        """Block until a pending save is complete and published."""
        if self.pending is not None:
            self._finalize()

    def _finalize(self) -> None:
        p = self.pending
        self.pending = None
        if p.future is not None:
            try:
                p.future.result()
            except (Exception, CheckpointException) as err:
                raise self._failed(p.step, p.tmp_dir, err) from None
        # every rank's data is written before anyone publishes (the JSON index alone is written by rank 0)
        file_barrier()
        error = None
        if self.rank == 0:
            try:
                for fname, text in p.rank0_files.items():
                    _write_text(p.tmp_dir / fname, text)
                if p.final_dir.exists():  # an older save of the same step (a rerun that redid it): replace
                    shutil.rmtree(p.final_dir)
                os.replace(p.tmp_dir, p.final_dir)
                pointer_tmp = self.root / (TMP_PREFIX + LATEST)
                _write_text(pointer_tmp, p.final_dir.name + "\n")
                os.replace(pointer_tmp, self.root / LATEST)
                self._prune()
            except OSError as err:
                error = err
        if not file_flag(error is None):  # rank 0 renamed and pruned meanwhile: gloo, long timeout
            raise self._failed(p.step, p.tmp_dir, error or OSError("rank 0 could not publish the checkpoint"))

    def _prune(self) -> None:
        for old in list_steps(self.root)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, step_dir: str | Path, with_optimizer: bool, with_rng: bool, metadata=None,
             allow_missing_buffers: bool = False) -> bool:
        """Load model (+ optimizer) from any hibari checkpoint into the current layout; DCP reshards.

        allow_missing_buffers: an init checkpoint (a converted model) may lack non-parameter state the recipe
        keeps (it is then built fresh). Returns whether this rank's RNG state was restored (False when the
        checkpoint came from fewer ranks).
        """
        step_dir = Path(step_dir)
        metadata = metadata or read_checked_index(step_dir)
        keys = set(metadata.state_dict_metadata)
        if with_optimizer and not any(k.startswith(OPTIMIZER_PREFIX) for k in keys):
            raise HibariError(f"{step_dir}: has no optimizer state (a converted model?); set init.load_optimizer: "
                              f"false")
        state = self._state(with_optimizer)
        tensors, _ = split_state(state)
        missing = [k for k in _flat_keys(tensors) if k not in keys]
        params = {f"model.{n}" for n in self._param_names()}
        if missing and allow_missing_buffers and not any(k in params or not k.startswith("model.") for k in missing):
            tensors = _drop_keys(tensors, set(missing))
        elif missing:
            raise CheckpointError(f"{step_dir}: lacks {len(missing)} tensor(s) this run needs, e.g. {missing[0]!r} "
                                  f"(a different model or precision recipe?)")
        load_state(tensors, step_dir, metadata=metadata)
        extra_dir = step_dir / EXTRA_STATE_DIR
        if with_optimizer and extra_dir.is_dir():
            extra = {}
            for path in sorted(extra_dir.glob("rank_*.json")):
                extra.update(read_json_object(path, "optimizer state", CheckpointError))
            merge_extra(state, extra, str(extra_dir))
        self.engine.load_model_state_dict(state["model"])
        if with_optimizer:
            self.engine.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        if with_rng:
            path = rank_file(step_dir, RNG_DIR, self.rank)
            if path.is_file():
                set_rng_state(read_json_object(path, "RNG state", CheckpointError), path)
                return True
        return False

    def _param_names(self) -> set[str]:
        from parallel.parallelize import strip_wrapper_prefixes

        return {strip_wrapper_prefixes(n) for n, _ in self.engine.named_parameters()}


def async_stager(device: torch.device):
    """The staging step of an async save: copies the state to CPU memory before the background write (training
    then goes on updating the originals). On CUDA into pinned buffers with non-blocking copies, kept from one save
    to the next (pinning is slow, a checkpoint's size does not change); on CPU a plain copy."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))


def _write_text(path: Path, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # name the file (a write error alone does not)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


__all__ = ["Checkpointer", "CheckpointError", "all_ranks_flag", "barrier", "file_barrier", "file_work_group",
           "rng_state", "set_rng_state"]
