"""The hibari checkpoint format: which files a checkpoint directory holds and how they are named.

A hibari checkpoint (a converted model or a training step directory) is
    hibari_model.json    {"format": "hibari", "version": 1, "model": ModelArgs, "hf_config": {...} | null, ...}
    dcp_metadata.json    tensor index (global shapes, chunks, byte ranges): JSON, see megatron_ext.checkpoint.storage
    __<rank>_0.distcp    raw tensor bytes written by each rank (torch.distributed.checkpoint's layout)
Tensor keys are "model.<hibari name>" (+ "optimizer.<...>" in training checkpoints). A training step directory adds
    train_state.json     step, consumed samples, tokens, the LR schedule it was planned with
    extra_state/rank_N.json  non-tensor state of each rank (optimizer hyper-parameters), JSON
    rng/rank_N.json      RNG states of each rank (torch, python, numpy, cuda), JSON
    config.yaml          the run's resolved config at save time
and a run's `checkpoints/` directory holds step_XXXXXXXX directories plus `latest`, a one-line file naming the
newest complete one. Nothing in a checkpoint is a pickle: loading one never executes code a file controls.
"""

from __future__ import annotations

import json
from pathlib import Path

from hibari.errors import HibariError
from hibari.io import read_json_object
from megatron_ext.models.llama import ModelArgs

MODEL_JSON = "hibari_model.json"
MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
FORMAT_VERSION = 1
DCP_METADATA_JSON = "dcp_metadata.json"
TRAIN_STATE = "train_state.json"
CONFIG_YAML = "config.yaml"
LATEST = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
RNG_DIR = "rng"
EXTRA_STATE_DIR = "extra_state"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def rank_file(step_dir: str | Path, subdir: str, rank: int) -> Path:
    return Path(step_dir) / subdir / f"rank_{rank:05d}.json"


def model_json_dict(args: ModelArgs, hf_config: dict | None = None, **extra) -> dict:
    return {"format": "hibari", "version": FORMAT_VERSION, "model": args.model_dump(mode="json"),
            "hf_config": hf_config, **extra}


def write_model_json(out_dir: str | Path, args: ModelArgs, hf_config: dict | None = None, **extra) -> None:
    text = json.dumps(model_json_dict(args, hf_config, **extra), indent=2, ensure_ascii=False)
    Path(out_dir, MODEL_JSON).write_text(text, encoding="utf-8")


def read_model_json(ckpt_dir: str | Path) -> tuple[ModelArgs, dict]:
    """(architecture, the whole hibari_model.json) of a checkpoint; one-line HibariError when absent or corrupt."""
    path = Path(ckpt_dir, MODEL_JSON)
    if not Path(ckpt_dir).is_dir():
        raise HibariError(f"{ckpt_dir}: not a directory (expected a hibari checkpoint directory)")
    if not path.is_file():
        raise HibariError(f"{ckpt_dir}: not a hibari checkpoint ({MODEL_JSON} not found)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        args = ModelArgs.model_validate(meta["model"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise HibariError(f"{path}: corrupt model description ({type(err).__name__})") from None
    return args, meta


def read_train_state(step_dir: str | Path) -> dict:
    state = read_json_object(Path(step_dir) / TRAIN_STATE, "train state")
    for key in ("step", "consumed_samples"):
        if not isinstance(state.get(key), int) or state[key] < 0:
            raise HibariError(f"{Path(step_dir) / TRAIN_STATE}: unreadable train state (field {key!r} is not a "
                              f"non-negative integer)")
    return state


def list_steps(root: str | Path) -> list[Path]:
    """Step directories of a run's checkpoints/ (complete or not), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def latest_pointer(root: str | Path) -> Path | None:
    """The step directory `latest` names (whether or not it is complete), or None without a pointer."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not name.startswith(STEP_PREFIX) or "/" in name or "\\" in name:
        return None
    return Path(root) / name
