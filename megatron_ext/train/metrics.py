"""Per-step metrics of a run: `<run.dir>/metrics.jsonl` (one JSON object per step), `loss.png`, TensorBoard.

Only rank 0 writes. Every step record has the same keys:
    step, loss, val_loss (null except on validation steps), lr, grad_norm, tokens (global, this step),
    consumed_samples, step_time_s, tokens_per_s, tokens_per_s_per_device, mfu (against the device's dense bf16
    peak, comparable across recipes), mfu_recipe (against the dense peak of the dtype the recipe's GEMMs run in,
    parallel.flops.RECIPE_GEMM_DTYPE: fp8 recipes 2x, nvfp4 4x the bf16 peak where the device has that path; both
    null when the peak is unknown, e.g. CPU), max_memory_mib (CUDA: max allocated; CPU: peak RSS of the process),
    precision, time. Steps between two reads (log.interval) share the window's mean step time and throughput.
Event records carry an "event" key instead (e.g. {"event": "lr_change", "step", "old_lr", "new_lr", ...} when a
resume changed the LR of already-planned steps); `read_metrics` returns step records unless asked for events.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from hibari.errors import HibariError
from hibari.io import atomic_write
from megatron_ext.train.tracking import metric_name

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def max_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's dense peak."""
    if not peak_flops:
        return None
    return tokens_per_s_per_device * flops_per_token / peak_flops


def read_metrics(run_dir: str | Path, events: bool = False) -> list[dict]:
    """Step records of metrics.jsonl in file order (events=True: the event records instead)."""
    return [r for r in _read_records(run_dir) if ("event" in r) == events]


def _read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; the step is redone after resume
            if isinstance(record, dict):
                out.append(record)
    return out


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, sinks=()):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._sinks = list(sinks)  # experiment trackers (megatron_ext/train/tracking.py): get every record too
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise HibariError("log.tensorboard: true needs the tensorboard package (pip install tensorboard)") \
                    from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (done by a run that crashed before its next checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        # events at the resume step are logged again by this run when they still apply
        keep = [r for r in _read_records(self.run_dir)
                if r.get("step", 0) < step or (r.get("step", 0) == step and r.get("event") in (None, "eval"))]
        with atomic_write(self.path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in keep).encode("utf-8"))

    def _append(self, record: dict) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: name the file (a failed write alone does not)
            raise HibariError(f"{self.path}: {err.strerror or err}") from None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(record)
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(metric_name(key), value, step)
        for sink in self._sinks:
            sink.log(record)

    def log_event(self, record: dict) -> None:
        """A one-off record with an "event" key (not a step: plots and step readers skip it)."""
        if self.enabled:
            self._append(record)
            for sink in self._sinks:
                sink.log_event(record)

    def plot(self) -> None:
        if not self.enabled:
            return
        plot_loss(self.run_dir)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """loss (and validation loss) against step, from metrics.jsonl."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    # data.valid: one curve per named held-out set (val/<name>/loss)
    names = sorted({k[4:-5] for r in records for k in r if k.startswith("val/") and k.endswith("/loss")})
    for name in names:
        points = [(r["step"], r[f"val/{name}/loss"]) for r in records if r.get(f"val/{name}/loss") is not None]
        if points:
            ax.plot(*zip(*points), "s--", label=f"validation {name}", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out
