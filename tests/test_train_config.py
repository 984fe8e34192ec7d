"""Bad training configs fail with one line naming the field, before any process group or file exists."""

import subprocess
import sys
from pathlib import Path

import pytest

from hibari.config import load_config
from hibari.errors import HibariError
from megatron_ext.train.config import TrainConfig
from megatron_ext.train.preflight import plan

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


# ---- pre-flight: everything knowable before start, one line each (preflight(cfg, world_size)) ----

def _preflight(overrides, world=1, **kw):
    from megatron_ext.train.preflight import preflight

    return preflight(load_config(TrainConfig, TINY, overrides), world, **kw)


def _dataset(prefix, docs, vocab=None):
    import json

    import numpy as np

    from data_pipeline.indexed.writer import IndexedDatasetBuilder

    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in docs:
            b.add_document(np.asarray(doc))
    if vocab is not None:
        Path(f"{prefix}.json").write_text(json.dumps({"vocab_size": vocab}))
    return str(prefix)


@pytest.mark.parametrize("overrides, world, expected", [
    (["parallel.tp=2", "train.seq_length=63"], 2, "field train.seq_length: 63 is not divisible by parallel.tp=2"),
    (["precision.recipe=nvfp4", "model.ffn_hidden_dim=72"], 1,
     "nvfp4 quantizes layers.1.feed_forward.w1, which is 64->72; both sizes must be multiples of 16"),
    (["precision.recipe=mxfp8", "parallel.tp=2"], 2,
     "mxfp8 quantizes layers.1.attention.wk, which is 64->32 (64->16 per TP rank); both sizes must be multiples "
     "of 32"),
    (["precision.recipe=nvfp4", "precision.backend=te", "parallel.tp=2"], 2,
     "field precision.backend: te is not supported with parallel.tp=2"),
    (["data={type: indexed, blend: [[1.0, /nonexistent/ja]]}"], 1,
     "field data.blend[0]: /nonexistent/ja.bin not found"),
])
def test_preflight_errors_are_one_line(overrides, world, expected):
    with pytest.raises(HibariError) as err:
        _preflight(overrides, world)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg, msg


def test_preflight_passes_what_runs():
    # the same recipes with sizes that fit, and sequence parallelism with a divisible sequence
    _preflight(["precision.recipe=nvfp4"])
    _preflight(["precision.recipe=mxfp8", "model.n_kv_heads=4"], world=2)
    _preflight(["parallel.tp=2", "train.seq_length=64"], world=2)
    _preflight(["parallel.tp=2", "parallel.sequence_parallel=false", "train.seq_length=63"], world=2)


def test_preflight_data_vocab_and_size(tmp_path):
    docs = [[5, 6, 7, 8, 2]] * 40
    small = _dataset(tmp_path / "small", docs)
    notes = _preflight([f"data={{type: indexed, blend: [[1.0, {small}]], split: [1.0, 0.0]}}"]).notes
    assert any("epochs" in n and small in n for n in notes), notes  # 200 tokens read over many epochs: reported
    # the vocabulary `hibari data tokenize` recorded is larger than the model's embeddings
    big_vocab = _dataset(tmp_path / "big_vocab", docs, vocab=32000)
    with pytest.raises(HibariError, match=r"tokenizer vocabulary \(32000 tokens\) is larger than the model's"):
        _preflight([f"data={{type: indexed, blend: [[1.0, {big_vocab}]]}}"])
    # no record: the token ids themselves are checked
    oov = _dataset(tmp_path / "oov", [[5, 6, 300, 2]] * 10)
    with pytest.raises(HibariError, match=r"oov.bin: token id 300 does not fit the model's vocabulary \(256\)"):
        _preflight([f"data={{type: indexed, blend: [[1.0, {oov}]]}}"])
    # a validation split without a single sample
    with pytest.raises(HibariError, match="field data.split: the valid part of .* holds 0 tokens"):
        _preflight([f"data={{type: indexed, blend: [[1.0, {small}]], split: [0.999, 0.001]}}",
                    "train.eval_interval=5"])


def test_preflight_init_from_must_match_the_model(tmp_path):
    import json
    import shutil

    from megatron_ext.train.loop import train
    from train_helpers import tiny_cfg

    run = tmp_path / "run"
    train(tiny_cfg(run, train={"steps": 1}, checkpoint={"interval": 0}))
    step = run / "checkpoints" / "step_00000001"
    _preflight(["model=null", f"init.from={step}", "init.load_optimizer=true"])
    # hibari_model.json says dim 64, the tensors are 32 wide
    bad = tmp_path / "bad"
    shutil.copytree(step, bad)
    meta = json.loads((bad / "hibari_model.json").read_text())
    meta["model"]["dim"] = 64
    (bad / "hibari_model.json").write_text(json.dumps(meta))
    with pytest.raises(HibariError, match=r"field init.from: tensor 'tok_embeddings.weight' of .* is \[256, 32\], "
                                          r"the model needs \[256, 64\]"):
        _preflight(["model=null", f"init.from={bad}"])
    # a missing shard is found before start, not after the process group is up
    (bad / "__0_0.distcp").unlink()
    with pytest.raises(HibariError, match=r"field init.from: .*__0_0.distcp: checkpoint shard missing"):
        _preflight(["model=null", f"init.from={bad}"])


def test_cli_check_reports_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = _cli("train", str(TINY), f"run.dir={run_dir}", "--check")
    assert r.returncode == 0 and "config ok: world 1" in r.stdout, r.stderr
    r = _cli("train", str(TINY), f"run.dir={run_dir}", "precision.recipe=nvfp4", "model.dim=72", "--check")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "multiples of 16" in r.stderr, r.stderr
    assert "rerun" not in r.stderr and "rerun" not in r.stdout
    r = _cli("train", str(TINY), f"run.dir={run_dir}", "train.stop_at=80")
    assert r.returncode == 2 and "train.stop_at (80) exceeds train.steps (50)" in r.stderr, r.stderr
    assert not run_dir.exists()
