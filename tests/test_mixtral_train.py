"""`hibari train` with configs/tiny-mixtral.yaml (shrunk): router metrics in metrics.jsonl, bitwise resume, one-line
errors for layouts Mixtral does not support yet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hibari.config import load_config
from hibari.errors import HibariError
from megatron_ext.train.config import TrainConfig
from megatron_ext.train.loop import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-mixtral.yaml"
SMALL = ["model.n_layers=2", "model.dim=32", "model.ffn_hidden_dim=64", "train.seq_length=32",
         "train.global_batch_size=4", "train.eval_interval=0", "log.progress=false", "log.plot=false"]


def _cfg(run_dir, *overrides):
    return load_config(TrainConfig, CONFIG, [f"run.dir={run_dir}", *SMALL, *overrides])


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if '"event"' not in line]


def test_router_metrics_logged_and_resume_is_bitwise(tmp_path):
    straight = train(_cfg(tmp_path / "a", "train.steps=4", "checkpoint.interval=0"))
    records = _records(tmp_path / "a")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    cfg = _cfg(tmp_path / "a", "train.steps=4")
    k, blocks, experts = cfg.model.n_experts_per_tok, cfg.model.n_layers, cfg.model.n_experts
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    for r in records:
        # the HF load-balancing loss is 1.0 x top_k for perfectly balanced routing and grows with imbalance
        assert k * 0.9 < r["aux_loss"] < experts and r["z_loss"] > 0
        assert len(r["expert_load"]) == blocks and all(len(row) == experts for row in r["expert_load"])
        assert all(sum(row) == tokens_per_step * k for row in r["expert_load"])  # every assignment counted once
    assert records[0]["expert_load"] != records[-1]["expert_load"]  # routing changes as the router trains

    train(_cfg(tmp_path / "b", "train.steps=4", "train.stop_at=2"))
    resumed = train(_cfg(tmp_path / "b", "train.steps=4"))
    assert resumed["resumed_from"].endswith("step_00000002")
    assert resumed["losses"][3] == straight["losses"][3] and resumed["losses"][4] == straight["losses"][4]
    assert _records(tmp_path / "b")[-1]["expert_load"] == records[-1]["expert_load"]


@pytest.mark.parametrize("override, world, message", [
    ("parallel.dp_shard=-1", 1, "parallel.ep=2: must divide dp_shard=1"),
    ("model.n_experts=3", 2, "model.n_experts=3 is not divisible by ep"),
    ("parallel.pp=2", 2, "parallel.ep=2: must divide dp_shard=1"),
])
def test_unsupported_expert_layouts_are_one_line_errors(tmp_path, override, world, message):
    from parallel import validate_layout

    cfg = _cfg(tmp_path / "x", "parallel.ep=2", override)
    with pytest.raises(HibariError, match=re.escape(message)):
        validate_layout(cfg.parallel, cfg.model, world_size=world)


def test_expert_parallel_with_pipeline_is_accepted(tmp_path):
    """EP x PP (tests/test_mixtral_pp.py runs it): 4 ranks = pp 2 x dp_shard 2, the experts sharded over ep 2."""
    from parallel import validate_layout

    cfg = _cfg(tmp_path / "x", "parallel.ep=2", "parallel.pp=2")
    assert validate_layout(cfg.parallel, cfg.model, world_size=4).dp_shard == 2


def test_dense_model_with_expert_parallel_is_refused(tmp_path):
    from parallel import validate_layout

    cfg = load_config(TrainConfig, Path(CONFIG).parent / "tiny.yaml", [f"run.dir={tmp_path}", "parallel.ep=2"])
    with pytest.raises(HibariError, match="needs a mixture-of-experts model"):
        validate_layout(cfg.parallel, cfg.model, world_size=2)


def test_delayed_scaling_recipe_is_refused_before_start(tmp_path):
    from megatron_ext.train.preflight import preflight

    # every recipe quantizes the experts (tests/test_precision_moe.py); fp8_delayed's histories only without EP
    cfg = _cfg(tmp_path / "q", "precision.recipe=fp8_delayed", "parallel.ep=2")
    with pytest.raises(HibariError, match="field parallel.ep: fp8_delayed keeps per-expert amax histories"):
        preflight(cfg, 2, scan_tokens=False)
    assert not (tmp_path / "q").exists()  # refused before the run directory exists
