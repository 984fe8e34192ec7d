"""Bad training configs fail with one line naming the field, before any process group or file exists."""

import subprocess
import sys
from pathlib import Path

import pytest

from hibari.config import load_config
from hibari.errors import HibariError
from megatron_ext.train.config import TrainConfig
from megatron_ext.train.loop import plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _plan(overrides, world=1):
    return plan(load_config(TrainConfig, TINY, overrides), world)


@pytest.mark.parametrize("override, field", [
    ("train.steps=0", "field train.steps"),
    ("train.micro_batch_size=-1", "field train.micro_batch_size"),
    ("train.stepz=3", "field train.stepz: unknown key"),
    ("lr.schedule=linear", "field lr.schedule"),
    ("data.type=parquet", "field data"),
    ("precision.recipe=fp16", "field precision.recipe"),
    ("init.from=7", "field init.from"),
])
def test_schema_errors_name_the_field(override, field):
    with pytest.raises(HibariError) as err:
        load_config(TrainConfig, TINY, [override])
    msg = str(err.value)
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize("overrides, world, field", [
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size"),
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 3, "train.global_batch_size: 8"),  # 8 % (2 x 3)
    (["parallel.tp=2"], 3, "parallel"),
    (["parallel.tp=8"], 8, "parallel.tp=8"),  # 4 heads do not split 8 ways
    (["train.seq_length=1024"], 1, "train.seq_length"),
    (["parallel.pp=2", "train.micro_batch_size=1", "train.global_batch_size=4"], 2, "train.micro_batch_size"),
    (["init.from=/nonexistent/ckpt", "model=null"], 1, "init.from"),
])
def test_layout_errors_name_the_field(overrides, world, field):
    with pytest.raises(HibariError) as err:
        _plan(overrides, world)
    msg = str(err.value)
    assert field in msg and "\n" not in msg, msg


def test_valid_layouts_resolve_grad_accumulation():
    _, layout, accum = _plan(["parallel.tp=2"], 4)  # dp 2 x tp 2; 8 / (2 x 2) = 2
    assert (layout.dp_shard, layout.tp, accum) == (2, 2, 2)
    _, layout, accum = _plan([], 1)
    assert (layout.dp_shard, accum) == (1, 4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_configs_one_line_and_no_files(tmp_path):
    run_dir = tmp_path / "run"
    r = _cli("train", str(TINY), f"run.dir={run_dir}", "train.global_batch_size=7")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("hibari: error:")
    assert "train.global_batch_size" in r.stderr
    r = _cli("launch", "local", "--nproc", "3", str(TINY), f"run.dir={run_dir}", "parallel.tp=2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "world size 3" in r.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("name, params_b", [("llama2-7b-swallow", 6.83), ("mistral-7b", 7.24)])
def test_realistic_configs_validate_for_16_gpus(name, params_b):
    cfg = load_config(TrainConfig, REPO / "configs" / f"{name}.yaml", ["init.from=null"])
    model_args, layout, accum = plan(cfg, 16)
    assert (layout.tp, layout.pp, layout.dp_shard, accum) == (2, 2, 4, 32)  # Swallow 7B layout: TP2 PP2 DP4
    assert cfg.train.global_batch_size * cfg.train.seq_length == 1024 * 4096
    assert (cfg.lr.lr, cfg.lr.min_lr, cfg.lr.warmup_steps, cfg.optim.weight_decay) == (1e-4, 3.3e-6, 1000, 0.1)
    assert cfg.data.type == "indexed" and round(model_args.num_params() / 1e9, 2) == params_b
