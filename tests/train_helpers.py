"""Small training configs shared by the training-loop, checkpoint and launch tests."""

from __future__ import annotations

from hibari.config import validate

TINY_MODEL = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, max_seq_len=64)


def tiny_cfg(run_dir, **sections):
    """A TrainConfig for a ~20k-parameter Llama on synthetic data; `sections` replace/extend the defaults."""
    from megatron_ext.train.config import TrainConfig

    data = {
        "run": {"dir": str(run_dir)},
        "model": dict(TINY_MODEL),
        "train": dict(steps=6, seed=7, global_batch_size=4, micro_batch_size=2, seq_length=32),
        "lr": dict(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        "precision": {"recipe": "fp32"},
        "checkpoint": {"interval": 3, "keep_last": 5},
        "log": {"progress": False, "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate(TrainConfig, data)
