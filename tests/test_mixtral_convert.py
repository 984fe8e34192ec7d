"""Mixtral HF <-> hibari conversion: bit-exact round trip, export loads in transformers, vocabulary expansion,
one-line errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixtral_fixtures import make_hf_mixtral, save_hf_mixtral  # noqa: E402

from checkpoints import load_hibari  # noqa: E402
from checkpoints.convert import hf_to_hibari, hibari_to_hf  # noqa: E402
from megatron_ext.checkpoint import load_model_state  # noqa: E402
from hibari.errors import HibariError  # noqa: E402


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("variant", ["top2_of_4", "tied_top3_of_8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical(variant, dtype, tmp_path):
    hf = save_hf_mixtral(tmp_path / "hf", variant, dtype=dtype)
    hf_to_hibari(hf, tmp_path / "ckpt")
    state, meta = load_model_state(tmp_path / "ckpt")
    assert meta["model"]["arch"] == "mixtral" and meta["model"]["n_experts"] in (4, 8)
    assert state["layers.0.feed_forward.experts.w1"].dim() == 3  # experts stacked per block
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "back")
    a, b = _tensors(hf), _tensors(tmp_path / "back")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    cfg_a = json.loads((hf / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                "sliding_window", "tie_word_embeddings", "rms_norm_eps"):
        assert cfg_a.get(key) == cfg_b.get(key), key


def test_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = save_hf_mixtral(tmp_path / "hf", "swa_top1")
    hf_to_hibari(hf, tmp_path / "ckpt")
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size="100KB")  # sharded, with an index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hibari(tmp_path / "ckpt")(ids), model(ids).logits, atol=1e-5, rtol=0)


def test_missing_or_misshapen_expert_is_one_line_error(tmp_path):
    hf = save_hf_mixtral(tmp_path / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    gone = dict(weights)
    del gone["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(gone, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HibariError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        hf_to_hibari(hf, tmp_path / "ckpt")
    bad = dict(weights)
    bad["model.layers.0.block_sparse_moe.experts.0.w2.weight"] = torch.zeros(3, 3)
    save_file(bad, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HibariError, match=r"experts\.0\.w2\.weight' has shape \[3, 3\], expected \[64, 96\]"):
        hf_to_hibari(hf, tmp_path / "ckpt")
    extra = dict(weights)
    extra["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = weights[
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone()
    save_file(extra, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HibariError, match="does not belong to a 2-layer model with 4 experts"):
        hf_to_hibari(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_expand_vocab_mixtral_hf_and_hibari(tmp_path):
    """Vocabulary expansion on a Mixtral checkpoint (HF dir and hibari checkpoint): experts untouched, original
    rows bit-identical, logits of original tokens unchanged."""
    from tokenizer_utils import make_base_tokenizer

    from checkpoints.expand_vocab import expand_hf, expand_hibari
    from data_pipeline.tokenizer.spm import expand_tokenizer, train_tokenizer
    from tokenizer_utils import japanese_lines, write_corpus

    base = make_base_tokenizer(tmp_path / "base")
    write_corpus(tmp_path / "ja.jsonl", japanese_lines(300))
    train_tokenizer([str(tmp_path / "ja.jsonl")], 520, tmp_path / "ja", threads=1, show_progress=False)
    stats = expand_tokenizer(base, tmp_path / "ja", tmp_path / "merged", pad_to_multiple=8)
    base_size, padded = stats["base_vocab_size"], stats["padded_vocab_size"]
    assert padded > base_size
    src = save_hf_mixtral(tmp_path / "hf", vocab_size=base_size)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / f, src / f)

    expand_hf(src, tmp_path / "merged", tmp_path / "hf_out")
    old, new = _tensors(src), _tensors(tmp_path / "hf_out")
    for name in old:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert new[name].shape[0] == padded and torch.equal(new[name][:base_size], old[name])
        else:
            assert torch.equal(new[name], old[name]), name
    from transformers import AutoModelForCausalLM

    expanded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"), experts_implementation="eager").eval()
    original = make_hf_mixtral(vocab_size=base_size)
    ids = torch.randint(3, base_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(expanded(ids).logits[..., :base_size], original(ids).logits, atol=1e-5, rtol=0)

    hf_to_hibari(src, tmp_path / "ckpt")
    expand_hibari(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "ckpt2", base_tokenizer=base)
    with torch.no_grad():
        got = load_hibari(tmp_path / "ckpt2")(ids)
        want = load_hibari(tmp_path / "ckpt")(ids)
    assert got.shape[-1] == padded
    torch.testing.assert_close(got[..., :base_size], want, atol=1e-5, rtol=0)
