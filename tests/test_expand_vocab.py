"""`hibari convert expand-vocab` on the tests' own tiny Llama: ids kept, means exact, old logits unchanged."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer, write_corpus  # noqa: E402

from launch.cli import main as hibari  # noqa: E402
from hibari.errors import HibariError  # noqa: E402


def _tiny_llama(out: Path, vocab_size: int, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from data_pipeline.tokenizer.spm import expand_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("expand")
    base = make_base_tokenizer(root / "base")
    write_corpus(root / "ja.jsonl", japanese_lines(300))
    train_tokenizer([str(root / "ja.jsonl")], 520, root / "ja", threads=1, show_progress=False)
    stats = expand_tokenizer(base, root / "ja", root / "merged", pad_to_multiple=8)
    return root, base, root / "merged", stats


def _model_dir(root: Path, base: Path, name: str, rows: int, tied: bool) -> Path:
    d = _tiny_llama(root / name, rows, tied)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / f, d / f)
    return d


def _expected_sources(base_sp, piece: str) -> list[int] | None:
    """Independent expectation for pieces of Japanese characters only: the English base tokenizer has none of
    them, so it splits the text into '▁' (if the piece starts with one) plus UTF-8 byte-fallback pieces."""
    body = piece[1:] if piece.startswith("\u2581") else piece
    if not body or any(ord(c) < 0x3000 for c in body):
        return None
    ids = [base_sp.piece_to_id("\u2581")] if piece.startswith("\u2581") else []
    return ids + [base_sp.piece_to_id(f"<0x{b:02X}>") for b in body.encode("utf-8")]


@pytest.mark.parametrize("tied", [False, True])
def test_expand_vocab_hf(tmp_path, tokenizers, tied):
    import sentencepiece as spm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, merged, stats = tokenizers
    base_size, new_size, padded = stats["base_vocab_size"], stats["vocab_size"], stats["padded_vocab_size"]
    assert padded % 8 == 0 and padded >= new_size > base_size
    src = _model_dir(tmp_path, base, "src", base_size, tied)
    out = tmp_path / "out"
    assert hibari(["convert", "expand-vocab", "--hf", str(src), "--tokenizer", str(merged), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == padded
    old_w, new_w = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert ("lm_head.weight" in new_w) == (not tied)
    base_sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    new_sp = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    checked = 0
    for n in names:
        old, new = old_w[n], new_w[n]
        assert new.shape == (padded, old.shape[1])
        assert torch.equal(new[:base_size], old)  # original ids unchanged, bit for bit
        for i in range(base_size, new_size):
            want = _expected_sources(base_sp, new_sp.id_to_piece(i))
            if want is not None:
                torch.testing.assert_close(new[i], old[want].mean(0), rtol=0, atol=1e-6)
                checked += 1
        torch.testing.assert_close(new[new_size:], old.mean(0).expand(padded - new_size, -1), rtol=0, atol=1e-6)
    assert checked >= 50 * len(names)
    # logits of original tokens for text made only of original tokens are unchanged
    ids = torch.tensor([[1] + base_sp.encode(english_lines(1)[0])])
    old_model = AutoModelForCausalLM.from_pretrained(src).eval()
    new_model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        old_logits = old_model(ids).logits
        new_logits = new_model(ids).logits
    assert new_logits.shape[-1] == padded
    torch.testing.assert_close(new_logits[..., :base_size], old_logits, rtol=0, atol=1e-5)
    # the exported model with its tokenizer loads and generates
    tok = AutoTokenizer.from_pretrained(out)
    text = japanese_lines(1, seed=9)[0]
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0, 1:].tolist() == new_sp.encode(text)
    gen = new_model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4


def test_expand_vocab_hibari_ckpt(tmp_path, tokenizers):
    from checkpoints import load_hibari
    from checkpoints.convert import hf_to_hibari
    from checkpoints.expand_vocab import expand_hibari
    from megatron_ext.checkpoint import load_model_state

    root, base, merged, stats = tokenizers
    src = _model_dir(tmp_path, base, "src", stats["base_vocab_size"], tied=False)
    hf_to_hibari(src, tmp_path / "ckpt")
    s = expand_hibari(tmp_path / "ckpt", merged, tmp_path / "ckpt2", base_tokenizer=base)
    assert s["padded_vocab_size"] == stats["padded_vocab_size"]
    old_state, _ = load_model_state(tmp_path / "ckpt")
    new_state, meta = load_model_state(tmp_path / "ckpt2")
    assert meta["model"]["vocab_size"] == stats["padded_vocab_size"]
    for n in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(new_state[n][:stats["base_vocab_size"]], old_state[n])
    old_model = load_hibari(tmp_path / "ckpt")
    new_model = load_hibari(tmp_path / "ckpt2")
    ids = torch.tensor([[1, 5, 9, 30, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(new_model(ids)[..., :stats["base_vocab_size"]], old_model(ids), rtol=0, atol=1e-5)


def test_expand_vocab_bad_input(tmp_path, tokenizers, capsys):
    from checkpoints.expand_vocab import expand_hf

    root, base, merged, stats = tokenizers
    small = _model_dir(tmp_path, base, "small", stats["base_vocab_size"] - 10, tied=False)
    with pytest.raises(HibariError, match=r"embeddings have \d+ rows but the base tokenizer .* has \d+ tokens"):
        expand_hf(small, merged, tmp_path / "o1")
    other = make_base_tokenizer(tmp_path / "other", vocab_size=400)
    src = _model_dir(tmp_path, base, "src", stats["base_vocab_size"], tied=False)
    with pytest.raises(HibariError, match="is not an expansion of|smaller than the base"):
        expand_hf(src, merged, tmp_path / "o2", base_tokenizer=other)
    rc = hibari(["convert", "expand-vocab", "--tokenizer", str(merged), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "exactly one of --hf DIR or --ckpt DIR" in capsys.readouterr().err
