"""Pipeline parallelism: the stage split, the stage -> pp-rank map, schedule building and forward-only passes.

`stage_owner` is the project's one stage -> rank map; every other placement question is answered from it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16]  # activations crossing pipeline stages
_MAX_DIMS = 4


def stage_layer_ids(stage: int, n_stages: int, n_layers: int) -> list[int]:
    """Blocks of pipeline stage `stage` (even split; validate_layout guarantees divisibility)."""
    per = n_layers // n_stages
    return list(range(stage * per, (stage + 1) * per))


def stage_owner(stage: int, pp: int, schedule: str) -> int:
    """pp rank holding `stage`: loop placement (stage % pp) or, for ZBV, the V (r and 2pp-1-r on rank r)."""
    if schedule == "zbv":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def local_stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Stages held by a pp rank, in ascending order."""
    return [s for s in range(pp * stages_per_rank) if stage_owner(s, pp, schedule) == pp_rank]


def last_stage_owner(pp: int, stages_per_rank: int, schedule: str) -> int:
    """pp rank holding the last stage (where the loss is computed)."""
    return stage_owner(pp * stages_per_rank - 1, pp, schedule)


def build_schedule(parts: list[nn.Module], stage_ids: list[int], n_stages: int, device: torch.device, pp_group,
                   schedule: str, n_microbatches: int, loss_fn: Callable):
    """(PipelineStage objects, schedule) running `parts` (this rank's stages) with `n_microbatches` per step.

    scale_grads=False: `loss_fn` divides by the number of micro-batches itself.
    """
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    stages = [PipelineStage(part, stage, n_stages, device, group=pp_group) for part, stage in zip(parts, stage_ids)]
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}
    arg = stages[0] if schedule in ("gpipe", "1f1b") else stages
    return stages, kinds[schedule](arg, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def forward_only(parts: dict[int, nn.Module], pp_rank: int, pp: int, n_stages: int, schedule: str, pp_group,
                 device: torch.device, tokens: torch.Tensor, labels: torch.Tensor,
                 document_ids: torch.Tensor | None, n_microbatches: int, loss_fn: Callable) -> None:
    """Validation through the pipeline: micro-batches pass stage by stage with plain P2P sends; the last stage
    calls `loss_fn(output, labels)` per micro-batch. A stage may return a tuple (hidden state and tensors a plan
    carries between stages, e.g. MoE router statistics): the next stage gets them all as positional inputs.

    The schedules' own eval() runs backward actions on the zero-bubble runtimes; forward-only needs no schedule,
    only the stage order (works for loop and V placements alike). `parts`: stage index -> module, this rank's.
    """
    tok_mbs, lab_mbs = tokens.tensor_split(n_microbatches), labels.tensor_split(n_microbatches)
    doc_mbs = [None] * n_microbatches if document_ids is None else document_ids.tensor_split(n_microbatches)
    peer = lambda rank: dist.get_global_rank(pp_group, rank)  # noqa: E731
    for m in range(n_microbatches):
        doc = None if doc_mbs[m] is None else doc_mbs[m].to(device)
        hidden: tuple[torch.Tensor, ...] = ()
        for s in range(n_stages):
            owner = stage_owner(s, pp, schedule)
            nxt = stage_owner(s + 1, pp, schedule) if s + 1 < n_stages else None
            if owner == pp_rank:
                xs = (tok_mbs[m].to(device),) if s == 0 else hidden
                out = parts[s](*xs, document_ids=doc)
                if s == n_stages - 1:
                    loss_fn(out, lab_mbs[m].to(device))
                elif nxt == pp_rank:
                    hidden = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                else:
                    _send_tensors(tuple(out) if isinstance(out, (tuple, list)) else (out,), peer(nxt), pp_group,
                                  device)
            elif nxt == pp_rank:
                hidden = _recv_tensors(peer(owner), pp_group, device)


def _send_tensors(tensors: tuple[torch.Tensor, ...], dst: int, group, device: torch.device) -> None:
    """Each tensor after a header [more follow, dtype code, ndim, shape padded to _MAX_DIMS] (`_recv_tensors`)."""
    for i, t in enumerate(tensors):
        t = t.contiguous()
        header = [int(i + 1 < len(tensors)), _DTYPE_CODES.index(t.dtype), t.dim(), *t.shape]
        header = torch.tensor(header + [0] * (_MAX_DIMS - t.dim()), dtype=torch.int64, device=device)
        dist.send(header, dst, group=group)
        dist.send(t, dst, group=group)


def _recv_tensors(src: int, group, device: torch.device) -> tuple[torch.Tensor, ...]:
    out = []
    more = 1
    while more:
        header = torch.empty(3 + _MAX_DIMS, dtype=torch.int64, device=device)
        dist.recv(header, src, group=group)
        more, code, ndim, *shape = header.tolist()
        t = torch.empty(shape[:ndim], dtype=_DTYPE_CODES[code], device=device)
        dist.recv(t, src, group=group)
        out.append(t)
    return tuple(out)
