"""Single-process training loop: learning signal, metrics, weight-decay mask, init from a converted HF model."""

import json

import pytest
import torch

from megatron_ext.train.loop import train
from train_helpers import tiny_cfg


def test_loss_decreases_and_metrics_are_written(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", train={"steps": 12, "eval_interval": 6, "eval_batches": 1},
                   checkpoint={"interval": 0}, log={"plot": True})
    summary = train(cfg)
    losses = summary["losses"]
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.5, losses  # the n-gram data is learnable
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    keys = {"step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu",
            "mfu_recipe", "max_memory_mib", "precision", "consumed_samples"}
    assert keys <= set(records[0])
    assert records[0]["mfu"] is None and records[0]["mfu_recipe"] is None  # no peak FLOPs known on CPU
    assert records[0]["precision"] == "fp32"
    assert records[-1]["consumed_samples"] == 12 * 4
    assert [r["step"] for r in records if r["val_loss"] is not None] == [6, 12]
    assert records[0]["lr"] == pytest.approx(1.5e-3) and records[1]["lr"] == pytest.approx(3e-3)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    # the final checkpoint is a hibari checkpoint with the run's architecture
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000012"
    meta = json.loads((step_dir / "hibari_model.json").read_text())
    assert meta["model"]["dim"] == 32 and meta["step"] == 12
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_weight_decay_mask():
    from megatron_ext.models.llama import ModelArgs, Transformer
    from megatron_ext.train.config import OptimConfig
    from megatron_ext.train.optim import param_groups

    model = Transformer(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_hidden_dim=32))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups([model], OptimConfig(weight_decay=0.1))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no = sorted(names[id(p)] for p in no_decay["params"])
    assert no == ["layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight",
                  "tok_embeddings.weight"]
    assert "output.weight" in {names[id(p)] for p in decay["params"]}
    decay, no_decay = param_groups([model], OptimConfig(decay_embeddings=True))
    assert "tok_embeddings.weight" in {names[id(p)] for p in decay["params"]}


def test_init_from_converted_hf_model_matches_hf_loss(tmp_path):
    """First loss of a run initialised from a converted HF model == the HF model's loss on the same batch."""
    import torch.nn.functional as F

    from checkpoints.convert import hf_to_hibari, hibari_to_hf
    from checkpoints import load_hibari
    from hf_models import make_hf_model, save_hf_model
    from megatron_ext.train.data import SyntheticDataset

    hf_dir = save_hf_model("llama2_mha", tmp_path / "hf")
    hf_to_hibari(hf_dir, tmp_path / "base")
    cfg = tiny_cfg(tmp_path / "run", model=None, init={"from": str(tmp_path / "base")},
                   train={"steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "seq_length": 48},
                   checkpoint={"interval": 0})
    summary = train(cfg)

    ds = SyntheticDataset(256, 48, 4, num_ngrams=32, ngram_length=8, seed=7)
    batch = torch.stack([torch.from_numpy(ds[i]["tokens"]) for i in range(4)])
    with torch.no_grad():
        logits = make_hf_model("llama2_mha")(batch[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()
    assert summary["losses"][1] == pytest.approx(ref, abs=1e-5)

    # the trained step directory exports to HF and loads in transformers with the same logits
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000001"
    hibari_to_hf(step_dir, tmp_path / "export")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ours = load_hibari(step_dir)
    with torch.no_grad():
        diff = (exported(batch).logits - ours(batch)).abs().max().item()
        moved = (exported(batch).logits - make_hf_model("llama2_mha")(batch).logits).abs().max().item()
    assert diff <= 1e-5 and moved > 1e-4  # exported = trained weights, which moved away from the init

    # a converted model has no optimizer state: asking for it is a one-line error
    from hibari.errors import HibariError

    bad = tiny_cfg(tmp_path / "run2", model=None, init={"from": str(tmp_path / "base"), "load_optimizer": True})
    with pytest.raises(HibariError, match="no optimizer state"):
        train(bad)


def test_indexed_blend_with_document_mask_and_validation(tmp_path):
    """data.type: indexed through megatron_ext.data (two .bin/.idx datasets blended 3:1)."""
    import numpy as np

    from data_pipeline.indexed.writer import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    phrases = rng.integers(3, 256, size=(8, 6))
    for name, n_docs in (("ja", 120), ("en", 40)):
        with IndexedDatasetBuilder(tmp_path / name, np.uint16) as b:
            for _ in range(n_docs):
                doc = phrases[rng.integers(0, 8, size=rng.integers(2, 6))].reshape(-1)
                b.add_document(np.concatenate([doc, [2]]))  # EOD
    cfg = tiny_cfg(tmp_path / "run",
                   data={"type": "indexed", "blend": [[3.0, str(tmp_path / "ja")], [1.0, str(tmp_path / "en")]],
                         "split": [0.9, 0.1], "cache_dir": str(tmp_path / "cache")},
                   train={"steps": 8, "eval_interval": 4, "eval_batches": 1, "document_mask": True},
                   checkpoint={"interval": 0})
    summary = train(cfg)
    assert sorted(summary["val_losses"]) == [4, 8]
    assert summary["losses"][8] < summary["losses"][1] - 0.3
