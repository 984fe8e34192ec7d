"""train.stop_at + rerun == one uninterrupted run, bit for bit, for every precision recipe (one process, CPU).

Every block linear is quantized (bf16_first/last_layers: 0) so the recipe's state (stochastic-rounding noise,
delayed-scaling amax history, the precision switch) shapes every step after the resume.
"""

import json

import pytest
import torch

from megatron_ext.checkpoint import iter_model_tensors
from megatron_ext.train.loop import train
from train_helpers import tiny_cfg

# n_kv_heads = n_heads: wk/wv are 32 wide, so mxfp8's 32-blocks fit every linear
MODEL = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden_dim=64, max_seq_len=64)
RECIPES = {
    "fp32": {"recipe": "fp32"},
    "bf16": {"recipe": "bf16"},
    "fp8_tensorwise": {"recipe": "fp8_tensorwise"},
    "fp8_rowwise": {"recipe": "fp8_rowwise"},
    "fp8_delayed": {"recipe": "fp8_delayed", "amax_history_len": 4},
    "mxfp8": {"recipe": "mxfp8"},
    "nvfp4_sr": {"recipe": "nvfp4", "stochastic_rounding": True},
    "nvfp4_rne": {"recipe": "nvfp4", "stochastic_rounding": False},
    # switch after 1 of 4 steps' tokens: the run stops after the switch and resumes in the switched mode (with SR)
    "nvfp4_switched": {"recipe": "nvfp4", "switch_at": 0.25, "switch_mode": "forward_only"},
}


def _cfg(run, recipe, **train):
    precision = {"bf16_first_layers": 0, "bf16_last_layers": 0, **RECIPES[recipe]}
    # 32 tokens per step keeps the emulated NVFP4 GEMMs quick
    return tiny_cfg(run, model=dict(MODEL), precision=precision,
                    train={"steps": 4, "global_batch_size": 2, "micro_batch_size": 1, "seq_length": 16, **train},
                    checkpoint={"interval": 0})


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_stop_at_then_rerun_is_bitwise_uninterrupted(tmp_path, recipe):
    ref = train(_cfg(tmp_path / "ref", recipe))
    assert sorted(ref["losses"]) == [1, 2, 3, 4]

    run = tmp_path / "split"
    first = train(_cfg(run, recipe, stop_at=2))
    assert first["stopped_at"] and first["step"] == 2
    assert [first["losses"][s] for s in (1, 2)] == [ref["losses"][s] for s in (1, 2)]
    state = json.loads((run / "checkpoints" / "step_00000002" / "train_state.json").read_text())
    assert state["planned_steps"] == 4  # the schedule stayed planned for train.steps

    second = train(_cfg(run, recipe))
    assert second["resumed_from"].endswith("step_00000002")
    for step in (3, 4):
        assert second["losses"][step] == ref["losses"][step], (recipe, step, second["losses"][step],
                                                                ref["losses"][step])
    a = dict(iter_model_tensors(run / "checkpoints" / "step_00000004"))
    b = dict(iter_model_tensors(tmp_path / "ref" / "checkpoints" / "step_00000004"))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, (recipe, differing[:3])
    if recipe == "nvfp4_switched":
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["precision"] for r in records] == ["nvfp4"] + ["bf16_fwd+nvfp4_bwd"] * 3
