"""Experiment trackers fed by the metrics writer: Weights & Biases (`log.wandb`), next to metrics.jsonl/TensorBoard.

A tracker ("sink") receives every record the metrics writer logs: step records (`log`) and event records such as
downstream-eval results (`log_event`). Values are named the same way everywhere: a key with a "/" is already a
full name (`val/ja_web/loss`, `eval/hibari_ja_mc/acc`), any other numeric key goes under `train/` (`train/loss`).

    log:
      wandb: {project: hibari-cpt, name: swallow-7b-ja, mode: offline}

`mode: offline` writes the run under RUN/wandb/ without any network (upload later with `wandb sync RUN/wandb/...`);
`online` needs `wandb login` (or WANDB_API_KEY); `disabled` turns it off without removing the section. A resumed
run continues the same W&B run (its id is kept in RUN/wandb/hibari_run_id). wandb is an optional extra:
`pip install 'hibari[wandb]'`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field

from hibari.config import StrictModel
from hibari.errors import HibariError

WANDB_DIR = "wandb"
RUN_ID_FILE = "hibari_run_id"
WANDB_MISSING = "log.wandb needs the wandb package: pip install 'hibari[wandb]'"


class WandbConfig(StrictModel):
    project: str = Field(min_length=1, description="W&B project")
    name: str | None = Field(None, description="run name shown in W&B (default: the run directory's name)")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline: no network, files "
                                                                                  "under RUN/wandb/")
    entity: str | None = Field(None, description="W&B team or user (default: the logged-in user's)")


def metric_name(key: str) -> str:
    """`loss` -> `train/loss`; names that already carry a section (`val/ja_web/loss`) stay as they are."""
    return key if "/" in key else f"train/{key}"


def numeric_items(record: dict):
    """(full name, value) of the plottable values of a record (numbers; not step, time, or booleans)."""
    for key, value in record.items():
        if key in ("step", "time", "event") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield metric_name(key), value


class WandbSink:
    """One W&B run per hibari run directory (rank 0 only: the metrics writer is only enabled there)."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise HibariError(WANDB_MISSING) from None
        self.run_dir = Path(run_dir)
        root = self.run_dir / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        os.environ.setdefault("WANDB_SILENT", "true")  # no banner in the training log; errors still raise
        try:
            self.run = wandb.init(project=cfg.project, name=cfg.name or self.run_dir.name, entity=cfg.entity,
                                  mode=cfg.mode, dir=str(self.run_dir), id=run_id, resume="allow",
                                  config=config or {})
        except Exception as err:  # wandb raises its own types (CommError, UsageError, ...) for login/network
            raise HibariError(f"log.wandb: cannot start the W&B run ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); use mode: offline "
                              f"without network") from None
        self._last_step = -1

    def log(self, record: dict) -> None:
        values = dict(numeric_items(record))
        step = record.get("step")
        if not values or not isinstance(step, int):
            return
        # W&B drops values logged for a step below its last one (a resumed run re-doing steps): keep them in
        # metrics.jsonl only
        if step < self._last_step:
            return
        self._last_step = step
        self.run.log(values, step=step)

    def log_event(self, record: dict) -> None:
        if record.get("event") == "eval":
            self.log(record)

    def close(self) -> None:
        self.run.finish()


def build_sinks(log_cfg, run_dir: str | Path, enabled: bool) -> list:
    """The trackers a `log:` section asks for (none on ranks that do not write metrics)."""
    if not enabled:
        return []
    sinks = []
    wandb_cfg = getattr(log_cfg, "wandb", None)
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        config = None
        config_yaml = Path(run_dir) / "config.yaml"
        if config_yaml.is_file():
            from hibari.config import read_yaml

            config = read_yaml(config_yaml)
        sinks.append(WandbSink(wandb_cfg, run_dir, config=config))
    return sinks
