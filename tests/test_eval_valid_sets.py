"""Per-dataset validation (`data.valid`): each named held-out set gets `val/<name>/loss` and `val/<name>/ppl` in
metrics.jsonl and its own curve in the plot; the logged loss is the plain cross-entropy of the saved model on the
set's samples (oracle: the checkpoint loaded in one process, torch's cross_entropy); a blend component is read
from its validation documents only."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_datasets(root):
    from data_pipeline.indexed.writer import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    phrases = {"ja": rng.integers(3, 128, size=(8, 6)), "en": rng.integers(128, 256, size=(8, 6))}
    prefixes = {}
    for name, kind, n_docs in (("ja", "ja", 120), ("en", "en", 40), ("en_heldout", "en", 30)):
        with IndexedDatasetBuilder(root / name, np.uint16) as b:
            for _ in range(n_docs):
                doc = phrases[kind][rng.integers(0, 8, size=rng.integers(2, 6))].reshape(-1)
                b.add_document(np.concatenate([doc, [2]]))
        prefixes[name] = str(root / name)
    return prefixes


def _data(prefixes, tmp_path, valid):
    return {"type": "indexed", "blend": [[3.0, prefixes["ja"]], [1.0, prefixes["en"]]], "split": [0.9, 0.1],
            "cache_dir": str(tmp_path / "cache"), "valid": valid}


def test_blend_component_uses_its_validation_documents(tmp_path):
    from megatron_ext.data.indexed_dataset import IndexedDataset
    from megatron_ext.data.valid_sets import ValidSetConfig, build_valid_sets

    prefixes = _write_datasets(tmp_path)
    sets = build_valid_sets([ValidSetConfig(name="ja", prefix=prefixes["ja"]),
                             ValidSetConfig(name="en_heldout", prefix=prefixes["en_heldout"])],
                            [(3.0, prefixes["ja"]), (1.0, prefixes["en"])], (0.9, 0.1), seq_length=32,
                            num_samples=16, seed=7, cache_dir=str(tmp_path / "cache"))
    assert list(sets) == ["ja", "en_heldout"]
    ja = IndexedDataset(prefixes["ja"])
    first_valid_seq = int(ja.document_indices[108])  # 120 documents, 90 %: documents 108.. are held out
    seqs = {p[0] for i in range(16) for p in sets["ja"].sample_pieces(i)}
    assert seqs and min(seqs) >= first_valid_seq
    held = {p[0] for i in range(16) for p in sets["en_heldout"].sample_pieces(i)}
    assert min(held) < 5  # a dataset outside the blend is read from its first document on


def test_named_validation_curves(tmp_path, monkeypatch):
    from checkpoints import load_hibari
    from megatron_ext.data.valid_sets import ValidSetConfig, build_valid_sets
    from megatron_ext.train.loop import train
    from megatron_ext.train.metrics import plot_loss, read_metrics

    prefixes = _write_datasets(tmp_path)
    valid = [{"name": "ja", "prefix": prefixes["ja"]}, {"name": "en_heldout", "prefix": prefixes["en_heldout"]}]
    run = tmp_path / "run"
    cfg = tiny_cfg(run, data=_data(prefixes, tmp_path, valid),
                   train={"steps": 8, "eval_interval": 4, "eval_batches": 1}, checkpoint={"interval": 4})
    train(cfg)
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for name in ("ja", "en_heldout"):
        losses = {r["step"]: r[f"val/{name}/loss"] for r in records}
        assert [s for s, v in losses.items() if v is not None] == [4, 8]
        for r in records:
            if r["step"] in (4, 8):
                assert r[f"val/{name}/ppl"] == pytest.approx(math.exp(r[f"val/{name}/loss"]))
            else:
                assert r[f"val/{name}/ppl"] is None

    # oracle: the step-8 checkpoint in one process, cross-entropy over the set's samples
    model = load_hibari(run / "checkpoints" / "step_00000008")
    sets = build_valid_sets([ValidSetConfig(**v) for v in valid], [(3.0, prefixes["ja"]), (1.0, prefixes["en"])],
                            (0.9, 0.1), seq_length=32, num_samples=4, seed=7, cache_dir=str(tmp_path / "cache"))
    last = records[-1]
    for name, ds in sets.items():
        tokens = torch.from_numpy(np.stack([np.asarray(ds[i]["tokens"], dtype=np.int64) for i in range(4)]))
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
        assert last[f"val/{name}/loss"] == pytest.approx(expected, rel=1e-5), name
    assert last["val/ja/loss"] != pytest.approx(last["val/en_heldout/loss"], rel=1e-3)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val/ja/loss"] is None

    # the plot draws one curve per set, with the logged points
    import matplotlib.axes

    drawn = {}
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn[kwargs.get("label")] = (list(args[0]), list(args[1]))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = plot_loss(run, tmp_path / "plot.png")
    assert out.stat().st_size > 1000
    for name in ("ja", "en_heldout"):
        steps, values = drawn[f"validation {name}"]
        assert steps == [4, 8]
        assert values == [r[f"val/{name}/loss"] for r in records if r["step"] in (4, 8)]


def test_bad_valid_sets_are_one_line(tmp_path):
    from hibari.errors import ConfigError, HibariError
    from megatron_ext.train.loop import train

    prefixes = _write_datasets(tmp_path)
    with pytest.raises(ConfigError, match="appears twice"):
        tiny_cfg(tmp_path / "r1", data=_data(prefixes, tmp_path, [{"name": "a", "prefix": prefixes["ja"]},
                                                                   {"name": "a", "prefix": prefixes["en"]}]),
                 train={"eval_interval": 2})
    with pytest.raises(ConfigError, match="train.eval_interval"):
        tiny_cfg(tmp_path / "r2", data=_data(prefixes, tmp_path, [{"name": "a", "prefix": prefixes["ja"]}]))
    cfg = tiny_cfg(tmp_path / "r3", data=_data(prefixes, tmp_path, [{"name": "a", "prefix": str(tmp_path / "no")}]),
                   train={"eval_interval": 2})
    with pytest.raises(HibariError, match=str(tmp_path / "no")):
        train(cfg)


def test_resume_keeps_the_eval_results_of_its_checkpoint(tmp_path):
    """A run resumed at step N redoes the steps after N; the eval of checkpoint N (written by `hibari eval` or
    eval.interval) stays, later ones go (their steps are redone)."""
    from megatron_ext.train.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        writer.log({"step": step, "loss": 1.0 / step})
        if step % 2 == 0:
            writer.log_event({"event": "eval", "step": step, "eval/t/acc": step / 10})
    writer.log_event({"event": "lr_change", "step": 2, "old_lr": 1.0, "new_lr": 2.0})
    writer.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [(e["event"], e["step"]) for e in read_metrics(tmp_path, events=True)] == [("eval", 2)]
