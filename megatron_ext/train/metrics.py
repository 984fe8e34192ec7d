"""Per-step metrics of a run: `<run.dir>/metrics.jsonl` (one JSON object per step), `loss.png`, TensorBoard.

Only rank 0 writes. Every step record has the same keys:
    step, loss, val_loss (null except on validation steps), lr, grad_norm, tokens (global, this step),
    consumed_samples, step_time_s, tokens_per_s, tokens_per_s_per_device, mfu (null when the device peak is
    unknown, e.g. CPU), max_memory_mib (CUDA: max allocated; CPU: peak RSS of the process), precision, time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from hibari.errors import HibariError

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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; the step is redone after resume
    return out


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
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
        keep = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def plot(self) -> None:
        if not self.enabled:
            return
        plot_loss(self.run_dir)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
