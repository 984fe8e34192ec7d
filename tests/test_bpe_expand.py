"""`hibari tokenizer expand` for byte-level BPE (Llama 3 style tokenizer.json) and `convert expand-vocab` with it.

The base is trained here on English with the `tokenizers` library (Llama 3 split regex, ByteLevel, ignore_merges,
special tokens right after the BPE vocabulary, BOS template, chat template); it is expanded on real Japanese text
(shared Aozora files when present). Oracles are independent of the code under test: the `tokenizers` library's own
encode/decode, a from-scratch BPE trainer (recount every pair after every merge), and torch means.
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_utils import (JAPANESE, english_corpus_texts, english_lines, japanese_lines,  # noqa: E402
                             make_bpe_base_tokenizer, make_qwen_style_tokenizer, write_corpus)

from hibari.errors import HibariError  # noqa: E402
from launch.cli import main as hibari  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AOZORA = SHARED / "ja-plain-text" / "aozora"
FINEWEB = SHARED / "ja-web-text" / "fineweb2-edu-japanese-100" / "fineweb_100_samples.jsonl"
ADD_TOKENS = 400
# ASCII that Japanese web text is full of: in the expansion corpus, frequent enough that an unrestricted trainer
# would merge these pairs (checked: with every pair allowed, the ASCII and new-token tests below fail)
ASCII_BITS = ["kubectl apply -f config.yaml", "zqxjv wkpfy", "https://example.jp/path?q=1", "2024-12-02T10:00",
              "#include <stdio.h>", "user@example.co.jp", "0x7fff_ffff", "AKIAIOSFODNN7"]
EDGE_JA = ["東京 と 京都\n\n改行", "絵文字😀と鬱", "ＡＢＣ全角と半角ｶﾅ", "mixed English と日本語 text.", "¡Olá! café — “quotes”",
           "吾輩は猫である。名前はまだ無い。", "\u3000全角スペース\tタブ", "𠮷野家の𩸽"]


def _tok(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _ascii_chars() -> set[str]:
    """The byte-level characters that stand for ASCII bytes, as the tokenizers library itself maps them."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {byte_level.pre_tokenize_str(chr(b))[0][0] for b in range(128)}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The base, expanded by the real command: (root, base dir, expanded dir, what the command printed)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("bpe")
    base = make_bpe_base_tokenizer(root / "base")
    if AOZORA.is_dir():
        corpus = [str(AOZORA / name) for name in ("bocchan.txt", "hashire_merosu.txt", "lemon.txt", "viyon.txt")]
    else:  # no shared data: the built-in sentences still exercise every check below
        corpus = [str(write_corpus(root / "ja.jsonl", japanese_lines(400)))]
    rng = random.Random(3)
    mixed = [f"{ja} {rng.choice(ASCII_BITS)} {rng.choice(ASCII_BITS)}。" for ja in japanese_lines(300, seed=9)]
    corpus.append(str(write_corpus(root / "mixed.jsonl", mixed)))
    argv = ["tokenizer", "expand", "--base", str(base), "--corpus", *corpus, "--add-tokens", str(ADD_TOKENS),
            "--out", str(root / "out"), "--pad-to-multiple", "64"]
    if FINEWEB.is_file():
        argv += ["--sample", str(FINEWEB)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert hibari(argv) == 0
    return root, base, root / "out", buf.getvalue()


def test_every_base_id_kept_new_tokens_after_the_specials(ran):
    root, base, out, report = ran
    b, n = _tok(base), _tok(out)
    base_vocab, new_vocab = b.get_vocab(with_added_tokens=True), n.get_vocab(with_added_tokens=True)
    assert all(new_vocab[t] == i for t, i in base_vocab.items())  # every base id unchanged, specials included
    specials = {t["content"]: t["id"] for t in json.loads((base / "tokenizer.json").read_text())["added_tokens"]}
    assert min(specials.values()) == len(json.loads((base / "tokenizer.json").read_text())["model"]["vocab"])
    first_new = max(base_vocab.values()) + 1  # Llama 3 layout: specials right after the BPE vocabulary
    new_ids = sorted(set(new_vocab.values()) - set(base_vocab.values()))
    assert new_ids == list(range(first_new, first_new + ADD_TOKENS))
    assert n.get_vocab_size(with_added_tokens=True) == first_new + ADD_TOKENS
    ascii_chars = _ascii_chars()
    inverse = {i: t for t, i in new_vocab.items()}
    assert all(any(c not in ascii_chars for c in inverse[i]) for i in new_ids)  # every new token has a byte >= 0x80
    bj, nj = json.loads((base / "tokenizer.json").read_text()), json.loads((out / "tokenizer.json").read_text())
    assert nj["model"]["merges"][:len(bj["model"]["merges"])] == bj["model"]["merges"]  # new merges rank last
    assert len(nj["model"]["merges"]) >= len(bj["model"]["merges"]) + ADD_TOKENS
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert nj[key] == bj[key], key
    assert nj["model"]["ignore_merges"] is True
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # chat template and special tokens kept
        assert (out / name).read_bytes() == (base / name).read_bytes()
    meta = json.loads((out / "hibari_tokenizer.json").read_text())
    assert meta["base_vocab_size"] == first_new and meta["vocab_size"] == first_new + ADD_TOKENS
    assert meta["padded_vocab_size"] % 64 == 0 and meta["padded_vocab_size"] >= meta["vocab_size"]
    assert meta["added_tokens"] == ADD_TOKENS and not meta["stopped_early"]


def test_ascii_text_encodes_to_exactly_the_base_ids(ran):
    from transformers import AutoTokenizer

    root, base, out, report = ran
    rng = random.Random(0)
    alphabet = string.printable  # letters, digits, punctuation, whitespace incl. \t \n \r \x0b \x0c
    texts = english_corpus_texts() + english_lines(50, seed=5) + ASCII_BITS + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(300)] + [
        "def f(x):\n\treturn x ** 2  # comment\r\n", "   ", "\x00\x01\x7f control", "<|eot_id|> is special",
        "HTTP://EXAMPLE.COM/a?b=c&d=e", "1234567890 3.14159 -42 1e-9"]
    b, n = _tok(base), _tok(out)
    for add_special in (False, True):
        before = [e.ids for e in b.encode_batch(texts, add_special_tokens=add_special)]
        after = [e.ids for e in n.encode_batch(texts, add_special_tokens=add_special)]
        assert after == before
    hf_base, hf_new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    assert [hf_new(t)["input_ids"] for t in texts[-60:]] == [hf_base(t)["input_ids"] for t in texts[-60:]]
    split_base = AutoTokenizer.from_pretrained(base, split_special_tokens=True)  # special names as plain text
    split_new = AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    text = "<|eot_id|> ends a turn; <|begin_of_text|> starts one"
    assert split_new(text)["input_ids"] == split_base(text)["input_ids"] != hf_base(text)["input_ids"]
    assert "English sample: 7/7 texts encode to exactly the base ids" in report


def test_japanese_chars_per_token_improve_and_round_trip(ran):
    root, base, out, report = ran
    b, n = _tok(base), _tok(out)
    texts = list(JAPANESE) + EDGE_JA
    if FINEWEB.is_file():  # real CC-derived Japanese, not part of the expansion corpus
        texts += [json.loads(line)["text"] for line in FINEWEB.read_text(encoding="utf-8").splitlines()]
    if AOZORA.is_dir():
        texts += (AOZORA / "kokoro.txt").read_text(encoding="utf-8").splitlines()[:300]
    chars = sum(len(t) for t in texts)
    before = sum(len(e.ids) for e in b.encode_batch(texts, add_special_tokens=False))
    after_enc = n.encode_batch(texts, add_special_tokens=False)
    after = sum(len(e.ids) for e in after_enc)
    assert chars / after > 1.6 * (chars / before), (chars / before, chars / after)
    assert max(max(e.ids, default=0) for e in after_enc) >= len(b.get_vocab(with_added_tokens=True))
    for text, enc in zip(texts, after_enc):
        assert n.decode(enc.ids, skip_special_tokens=False) == text
    meta = json.loads((out / "hibari_tokenizer.json").read_text())
    assert meta["chars_per_token_after"] > 1.6 * meta["chars_per_token_before"]
    assert meta["sample_round_trips"] == meta["sample_texts"] > 0
    assert f"{meta['chars_per_token_before']:.3f} before, {meta['chars_per_token_after']:.3f} after" in report


@pytest.mark.skipif(not FINEWEB.is_file() or not AOZORA.is_dir(), reason="shared Japanese samples not present")
def test_round_trip_on_every_shared_japanese_sample(ran):
    root, base, out, report = ran
    n = _tok(out)
    texts = [json.loads(line)["text"] for line in FINEWEB.read_text(encoding="utf-8").splitlines()]
    for f in sorted(AOZORA.glob("*.txt")):  # whole lines, newlines included: the first 40,000 characters
        text = f.read_text(encoding="utf-8")
        texts.append(text[:text.find("\n", 40_000) + 1 or None])
    assert len(texts) == 100 + 13
    for text, enc in zip(texts, n.encode_batch(texts, add_special_tokens=False)):
        assert n.decode(enc.ids) == text


def test_autotokenizer_loads_with_specials_and_chat_template(ran):
    from transformers import AutoTokenizer

    root, base, out, report = ran
    hb, hn = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    assert len(hn) == len(hb) + ADD_TOKENS
    assert (hn.bos_token_id, hn.eos_token_id) == (hb.bos_token_id, hb.eos_token_id) == (1000, 1001)
    assert hn.convert_tokens_to_ids("<|eot_id|>") == hb.convert_tokens_to_ids("<|eot_id|>")
    chat = [{"role": "user", "content": "What is the capital of Japan?"}]
    assert hn.apply_chat_template(chat, add_generation_prompt=True) == \
        hb.apply_chat_template(chat, add_generation_prompt=True)
    text = "こんにちは<|eot_id|>世界"
    ids = hn(text)["input_ids"]
    assert ids[0] == 1000 and hn.convert_tokens_to_ids("<|eot_id|>") in ids
    assert hn.decode(ids, skip_special_tokens=True) == "こんにちは世界"


def _naive_bpe(segments: dict[str, list[str]], freqs: Counter, vocab: dict[str, int], ascii_chars: set[str],
               num_new: int, next_id: int):
    """From-scratch oracle: recount every eligible pair of every word after each merge (slow, obviously right)."""
    segs = {w: list(s) for w, s in segments.items()}
    vocab = dict(vocab)
    merges, new = [], 0
    while new < num_new:
        counts: Counter = Counter()
        for w, seg in segs.items():
            for x, y in zip(seg, seg[1:]):
                if any(c not in ascii_chars for c in x + y):
                    counts[(vocab[x], vocab[y])] += freqs[w]
        if not counts:
            break
        (a, b), c = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # most frequent, then smallest ids
        if c < 2:
            break
        inv = {i: t for t, i in vocab.items()}
        x, y = inv[a], inv[b]
        if x + y not in vocab:
            vocab[x + y] = next_id
            next_id += 1
            new += 1
        merges.append((x, y))
        for w, seg in segs.items():
            i, merged = 0, []
            while i < len(seg):
                if i + 1 < len(seg) and seg[i] == x and seg[i + 1] == y:
                    merged.append(x + y)
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segs[w] = merged
    return merges, segs


def test_incremental_merges_equal_a_from_scratch_trainer_and_the_tokenizer_reproduces_them(ran):
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer.bpe_expand import count_pretokens, expand_bpe_json

    root, base, out, report = ran
    b = _tok(base)
    data = json.loads((base / "tokenizer.json").read_text())
    freqs = count_pretokens(b, japanese_lines(120, seed=2) + ["ああああああ", "ああああ", "ーーーーー"] + EDGE_JA)
    new_data, stats = expand_bpe_json(data, freqs, 60)
    segments = {w: [t.value for t in b.model.tokenize(w)] for w in freqs}  # the base segmentation of each word
    first_new = max(b.get_vocab(with_added_tokens=True).values()) + 1
    want, final = _naive_bpe(segments, freqs, data["model"]["vocab"], _ascii_chars(), 60, first_new)
    got = [tuple(m) for m in new_data["model"]["merges"][len(data["model"]["merges"]):]]
    assert got == want and stats["added_tokens"] == 60
    # the expanded tokenizer's BPE model (applying merges by rank) reproduces the learned segmentation of each word
    model = Tokenizer.from_str(json.dumps(new_data)).model
    assert {w: [t.value for t in model.tokenize(w)] for w in final} == final


# -- convert expand-vocab, data tokenize, training, export, generate ------------------------------------------------
def _tiny_llama(out: Path, vocab_size: int, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1000, eos_token_id=1001)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


def _expected_sources(base_tok, token: str) -> list[int] | None:
    """Independent expectation: the FULL base tokenizer (normalizer + pre-tokenizer + model) on the token's decoded
    text, for new tokens whose bytes are whole UTF-8 characters forming one pre-token."""
    from tokenizers import decoders

    text = decoders.ByteLevel().decode([token])
    if "\ufffd" in text or len(base_tok.pre_tokenizer.pre_tokenize_str(text)) != 1:
        return None
    return base_tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("tied", [False, True])
def test_expand_vocab_rows_are_means_of_the_base_tokens(ran, tmp_path, tied):
    from safetensors.torch import load_file

    root, base, out, report = ran
    meta = json.loads((out / "hibari_tokenizer.json").read_text())
    base_size, new_size, padded = meta["base_vocab_size"], meta["vocab_size"], meta["padded_vocab_size"]
    src = _tiny_llama(tmp_path / "src", base_size, tied)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((base / f).read_bytes())
    assert hibari(["convert", "expand-vocab", "--hf", str(src), "--tokenizer", str(out), "--out",
                   str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["vocab_size"] == padded
    old_w, new_w = load_file(src / "model.safetensors"), load_file(tmp_path / "exp" / "model.safetensors")
    assert ("lm_head.weight" in new_w) == (not tied)
    b, inverse = _tok(base), {i: t for t, i in _tok(out).get_vocab(with_added_tokens=True).items()}
    for name in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        old, new = old_w[name], new_w[name]
        assert new.shape == (padded, old.shape[1]) and torch.equal(new[:base_size], old)
        checked = 0
        for i in range(base_size, new_size):
            want = _expected_sources(b, inverse[i])
            if want is not None:
                torch.testing.assert_close(new[i], old[want].mean(0), rtol=0, atol=1e-6)
                checked += 1
        assert checked >= 50, checked
        torch.testing.assert_close(new[new_size:], old.mean(0).expand(padded - new_size, -1), rtol=0, atol=1e-6)


def test_expand_vocab_tokenize_train_export_generate(ran, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hibari.config import dump_config
    from megatron_ext.data.indexed_dataset import IndexedDataset
    from train_helpers import tiny_cfg

    root, base, out, report = ran
    meta = json.loads((out / "hibari_tokenizer.json").read_text())
    src = _tiny_llama(tmp_path / "src", meta["base_vocab_size"], tied=False)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / f).write_bytes((base / f).read_bytes())
    exp, init, run = tmp_path / "exp", tmp_path / "init", tmp_path / "run"
    assert hibari(["convert", "expand-vocab", "--hf", str(src), "--tokenizer", str(out), "--out", str(exp)]) == 0
    assert hibari(["convert", "hf-to-hibari", "--hf", str(exp), "--out", str(init)]) == 0
    texts = japanese_lines(120, seed=7)
    write_corpus(tmp_path / "ja.jsonl", texts)
    assert hibari(["data", "tokenize", "--input", str(tmp_path / "ja.jsonl"), "--tokenizer", str(out), "--output",
                   str(tmp_path / "data" / "ja"), "--workers", "1", "--append-eod"]) == 0
    ds = IndexedDataset(str(tmp_path / "data" / "ja"))
    n = _tok(out)
    for i in (0, 57):  # BOS/EOS from tokenizer_config.json around the expanded tokenizer's ids
        assert ds[i].tolist() == [1000] + n.encode(texts[i], add_special_tokens=False).ids + [1001]
    assert max(int(ds[i].max()) for i in range(len(ds))) >= meta["base_vocab_size"]  # new tokens are used
    cfg = tiny_cfg(run, model=None, init={"from": str(init)},
                   data={"type": "indexed", "blend": [[1.0, str(tmp_path / "data" / "ja")]], "split": [1.0, 0.0],
                         "cache_dir": str(tmp_path / "cache")},
                   train={"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "seq_length": 32},
                   checkpoint={"interval": 0})
    dump_config(cfg, tmp_path / "train.yaml")
    assert hibari(["train", str(tmp_path / "train.yaml")]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
    step = run / "checkpoints" / "step_00000003"
    assert hibari(["convert", "hibari-to-hf", "--ckpt", str(step), "--out", str(tmp_path / "hf"), "--tokenizer",
                   str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.vocab_size == meta["padded_vocab_size"] and len(tok) == meta["vocab_size"]
    enc = tok("吾輩は猫である。", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == 1000 and enc["input_ids"].max().item() >= meta["base_vocab_size"]
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 6 or gen[0, -1].item() == tok.eos_token_id
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:]), str)


def test_expand_vocab_hibari_checkpoint_finds_the_recorded_base(ran, tmp_path):
    from checkpoints.convert import hf_to_hibari
    from checkpoints.expand_vocab import expand_hibari
    from megatron_ext.checkpoint import load_model_state

    root, base, out, report = ran
    meta = json.loads((out / "hibari_tokenizer.json").read_text())
    hf_to_hibari(_tiny_llama(tmp_path / "src", meta["base_vocab_size"], tied=False), tmp_path / "ckpt")
    s = expand_hibari(tmp_path / "ckpt", out, tmp_path / "ckpt2")  # base: the one hibari_tokenizer.json records
    assert (s["kind"], s["new_rows"], s["padded_vocab_size"]) == ("bpe", ADD_TOKENS, meta["padded_vocab_size"])
    old, _ = load_model_state(tmp_path / "ckpt")
    new, model_json = load_model_state(tmp_path / "ckpt2")
    assert model_json["model"]["vocab_size"] == meta["padded_vocab_size"]
    b, inverse = _tok(base), {i: t for t, i in _tok(out).get_vocab(with_added_tokens=True).items()}
    for name in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(new[name][:meta["base_vocab_size"]], old[name])
        i = next(i for i in range(meta["base_vocab_size"], meta["vocab_size"])
                 if _expected_sources(b, inverse[i]) is not None)
        torch.testing.assert_close(new[name][i], old[name][_expected_sources(b, inverse[i])].mean(0), rtol=0,
                                   atol=1e-6)


def test_qwen_style_base_and_a_model_with_spare_rows(tmp_path):
    """NFC normalizer, no BOS, vocab.json/merges.txt loaded by Qwen2Tokenizer; the model has spare rows past the
    tokenizer (as Qwen's 151,936 for 151,665 ids): new tokens take the unused rows first, then rows are added."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer.bpe_expand import expand_bpe_tokenizer

    base = make_qwen_style_tokenizer(tmp_path / "base")
    corpus = write_corpus(tmp_path / "ja.jsonl", japanese_lines(300, seed=4))
    s = expand_bpe_tokenizer(base, [str(corpus)], 100, tmp_path / "out", pad_to_multiple=16, show_progress=False)
    assert (s["base_vocab_size"], s["vocab_size"], s["padded_vocab_size"]) == (803, 903, 912)
    assert set(s["copied_files"]) == {"tokenizer_config.json", "vocab.json", "merges.txt"}
    hb, hn = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(hn).__name__ == "Qwen2Tokenizer" and len(hn) == 903 and hn.bos_token_id is None
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text())
    assert all(vocab[t] == i for t, i in json.loads((base / "vocab.json").read_text()).items())
    texts = english_lines(30, seed=1) + ["<|im_start|>user\nhello<|im_end|>", "ｶﾀｶﾅ 123 ﬁ"]
    assert [hn(t)["input_ids"] for t in texts[:31]] == [hb(t)["input_ids"] for t in texts[:31]]
    ja = japanese_lines(20, seed=11) + texts[-1:]
    assert sum(len(hn(t)["input_ids"]) for t in ja) < 0.7 * sum(len(hb(t)["input_ids"]) for t in ja)
    assert all(hn.decode(hn(t)["input_ids"]) == t for t in ja[:-1])  # NFC text round trips (ﬁ is NFC-stable)
    from data_pipeline.tokenizer.encoder import load_encoder

    enc = load_encoder(tmp_path / "out")  # `data tokenize`: BOS/EOS as tokenizer_config.json names them
    assert (enc.bos_id, enc.eos_id, enc.vocab_size) == (None, hn.convert_tokens_to_ids("<|im_end|>"), 903)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_bytes((tmp_path / "out" / "tokenizer.json").read_bytes())
    (tmp_path / "bad" / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|nope|>")))
    with pytest.raises(HibariError, match=r"eos_token '<\|nope\|>' is not a token of this tokenizer"):
        load_encoder(tmp_path / "bad")
    src = _tiny_llama(tmp_path / "src", 832, tied=True)  # 29 spare rows past the 803 ids
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (src / f).write_bytes((base / f).read_bytes())
    assert hibari(["convert", "expand-vocab", "--hf", str(src), "--tokenizer", str(tmp_path / "out"), "--out",
                   str(tmp_path / "exp")]) == 0
    old = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    new = load_file(tmp_path / "exp" / "model.safetensors")["model.embed_tokens.weight"]
    assert new.shape[0] == 912 and torch.equal(new[:803], old[:803])
    b = _tok(base)
    inverse = {i: t for t, i in _tok(tmp_path / "out").get_vocab(with_added_tokens=True).items()}
    checked = [i for i in range(803, 903) if _expected_sources(b, inverse[i]) is not None]
    assert any(i < 832 for i in checked) and any(i >= 832 for i in checked)
    for i in checked:
        torch.testing.assert_close(new[i], old[_expected_sources(b, inverse[i])].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(new[903:], old[:803].mean(0).expand(9, -1), rtol=0, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------------------------
def _write_tokenizer(path: Path, tok) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_bad_input_is_a_one_line_error(ran, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root, base, out, report = ran
    corpus = str(write_corpus(tmp_path / "ja.jsonl", japanese_lines(50)))
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(english_lines(100), trainers.WordPieceTrainer(vocab_size=200, show_progress=False))
    uni = Tokenizer(models.Unigram())
    uni.train_from_iterator(english_lines(100), trainers.UnigramTrainer(vocab_size=100, show_progress=False))
    no_merges = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    no_merges.pre_tokenizer = pre_tokenizers.ByteLevel()
    not_byte_level = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    not_byte_level.pre_tokenizer = pre_tokenizers.Metaspace()
    cases = [
        (_write_tokenizer(tmp_path / "wp", wp), "400", r"model type WordPiece: expected a byte-level BPE"),
        (_write_tokenizer(tmp_path / "uni", uni), "400", r"model type Unigram: expected a byte-level BPE"),
        (_write_tokenizer(tmp_path / "nm", no_merges), "400", r"the BPE model has no merges"),
        (_write_tokenizer(tmp_path / "meta", not_byte_level), "400", r"BPE without a ByteLevel pre-tokenizer"),
        (base, "0", r"--add-tokens 0: expected a positive number"),
        (tmp_path / "missing", "400", r"no such tokenizer dir or file"),
    ]
    for tok_dir, n, message in cases:
        rc = hibari(["tokenizer", "expand", "--base", str(tok_dir), "--corpus", corpus, "--add-tokens", n,
                     "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("hibari: error: "), err
        assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()  # nothing written for a bad base
    rc = hibari(["tokenizer", "expand", "--base", str(base), "--add", str(base), "--out", str(tmp_path / "o")])
    assert rc == 2 and "give --corpus FILES and --add-tokens N" in capsys.readouterr().err
    rc = hibari(["tokenizer", "expand", "--base", str(base), "--corpus", str(tmp_path / "nope.jsonl"),
                 "--add-tokens", "5", "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
    english = str(write_corpus(tmp_path / "en.jsonl", english_lines(50)))
    rc = hibari(["tokenizer", "expand", "--base", str(base), "--corpus", english, "--add-tokens", "5", "--out",
                 str(tmp_path / "o5")])
    assert rc == 2 and "no pair of non-ASCII tokens occurs 2 times" in capsys.readouterr().err
    stale = tmp_path / "o4"  # a dir left by a SentencePiece expansion: refused, then replaced with --overwrite
    stale.mkdir()
    (stale / "tokenizer.model").write_bytes(b"stale")
    argv = ["tokenizer", "expand", "--base", str(base), "--corpus", corpus, "--add-tokens", "20", "--out", str(stale)]
    assert hibari(argv) == 2 and "not empty" in capsys.readouterr().err
    assert hibari(argv + ["--overwrite"]) == 0 and not (stale / "tokenizer.model").exists()
    assert len(_tok(stale).get_vocab(with_added_tokens=True)) == 1008 + 20
    from checkpoints.expand_vocab import expand_hf

    src = _tiny_llama(tmp_path / "small", 500, tied=False)
    with pytest.raises(HibariError, match=r"embeddings have 500 rows but the base tokenizer .* has 1008 tokens"):
        expand_hf(src, out, tmp_path / "o2", base_tokenizer=base)
    with pytest.raises(HibariError, match="adds no tokens to the base tokenizer"):
        expand_hf(src, base, tmp_path / "o3", base_tokenizer=base)
