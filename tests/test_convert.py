"""HF <-> hibari conversion: bit-exact round trip, export loads and generates, bad input is one line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints.convert import hf_to_hibari, hibari_to_hf
from checkpoints import load_hibari
from hf_models import VARIANTS, save_hf_model
from hibari.errors import HibariError


def _hf_tensors(d):
    d = d if not isinstance(d, str) else __import__("pathlib").Path(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical(variant, dtype, tmp_path):
    hf = save_hf_model(variant, tmp_path / "hf", dtype=dtype)
    hf_to_hibari(hf, tmp_path / "ckpt")
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "back")
    a, b = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    cfg_a = json.loads((hf / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings",
                "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert cfg_a.get(key) == cfg_b.get(key), key


@pytest.mark.parametrize("variant", ["llama3_gqa", "mistral_swa"])
def test_export_loads_in_transformers_and_generates(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = save_hf_model(variant, tmp_path / "hf")
    hf_to_hibari(hf, tmp_path / "ckpt")
    # tiny shard limit forces the sharded layout with an index
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size="200KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    ours = load_hibari(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-5, rtol=0)


def test_export_dtype_cast(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    hf_to_hibari(hf, tmp_path / "ckpt")
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "bf16", dtype="bf16")
    t = _hf_tensors(tmp_path / "bf16")
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_files_copied(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    hf_to_hibari(hf, tmp_path / "ckpt")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    hibari_to_hf(tmp_path / "ckpt", tmp_path / "out", tokenizer=tok)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


# ---------------------------------------------------------------- bad input: one line, names the problem

def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_missing_config_json(tmp_path):
    (tmp_path / "hf").mkdir()
    rc, _, err = _cli("convert", "hf-to-hibari", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert err.strip().count("\n") == 0 and "config.json" in err and "Traceback" not in err


def test_unsupported_architecture(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HibariError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"):
        hf_to_hibari(hf, tmp_path / "o")


def test_wrong_tensor_shape(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    t = load_file(str(hf / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HibariError, match=r"up_proj.weight.*shape \[7, 64\], expected \[160, 64\]"):
        hf_to_hibari(hf, tmp_path / "o")


def test_missing_tensor(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    t = load_file(str(hf / "model.safetensors"))
    del t["model.norm.weight"]
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HibariError, match="missing 1 tensor.*model.norm.weight"):
        hf_to_hibari(hf, tmp_path / "o")


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated_safetensors(tmp_path, cut):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    f = hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    rc, _, err = _cli("convert", "hf-to-hibari", "--hf", str(hf), "--out", str(tmp_path / "o"))
    assert rc == 2 and "truncated or corrupt" in err and "model.safetensors" in err
    assert err.strip().count("\n") == 0


def test_output_dir_not_empty(tmp_path):
    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, err = _cli("convert", "hf-to-hibari", "--hf", str(hf), "--out", str(out))
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    rc, out_text, _ = _cli("convert", "hf-to-hibari", "--hf", str(hf), "--out", str(out), "--overwrite")
    assert rc == 0 and "converted" in out_text and not (out / "keep.txt").exists()


def test_not_a_hibari_checkpoint(tmp_path):
    rc, _, err = _cli("convert", "hibari-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"))
    assert rc == 2 and "hibari_model.json" in err


def test_no_unsafe_torch_load():
    """Project rule: no torch.load without weights_only=True anywhere in the packages."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for pkg in ("megatron_ext", "data_pipeline", "parallel", "checkpoints", "launch", "bench"):
        for f in (root / pkg).rglob("*.py"):
            for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text(encoding="utf-8")):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{f.relative_to(root)}: {m.group(0)}")
    assert not offenders, offenders


def test_checkpoint_code_never_unpickles():
    """Loading a hibari checkpoint reads JSON and raw bytes only: no torch.load / pickle.load in the code that does."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for pkg in ("megatron_ext/checkpoint", "megatron_ext/train", "checkpoints"):
        for f in (root / pkg).rglob("*.py"):
            for m in re.finditer(r"(torch\.load|pickle\.loads?|torch\.serialization)\(", f.read_text(encoding="utf-8")):
                offenders.append(f"{f.relative_to(root)}: {m.group(0)}")
    assert not offenders, offenders


@pytest.mark.parametrize("direction", ["hf-to-hibari", "hibari-to-hf"])
def test_failed_convert_leaves_no_partial_output(tmp_path, monkeypatch, direction):
    """A conversion that fails midway (here: the disk fills after the first tensors) leaves no output directory, no
    staging directory, and an --overwrite target exactly as it was."""
    import checkpoints.convert as convert_mod
    import checkpoints.hibari_ckpt as ckpt_mod

    hf = save_hf_model("llama2_mha", tmp_path / "hf")
    hf_to_hibari(hf, tmp_path / "ckpt")
    calls = {"n": 0}
    if direction == "hf-to-hibari":
        real = ckpt_mod.save_model_state

        def failing(state, out_dir, planner=None):
            def loader(name):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise OSError(28, "No space left on device", str(out_dir) + "/__0_0.distcp")
                return planner_loader(name)
            planner_loader = planner._loader
            planner._loader = loader
            return real(state, out_dir, planner=planner)

        monkeypatch.setattr(ckpt_mod, "save_model_state", failing)
        run = lambda out, **kw: hf_to_hibari(hf, out, **kw)  # noqa: E731
    else:
        real = convert_mod.iter_model_tensors

        def failing(ckpt_dir, names=None):
            for i, item in enumerate(real(ckpt_dir, names)):
                if i == 3:
                    raise OSError(28, "No space left on device")
                yield item

        monkeypatch.setattr(convert_mod, "iter_model_tensors", failing)
        run = lambda out, **kw: hibari_to_hf(tmp_path / "ckpt", out, max_shard_size="100KB", **kw)  # noqa: E731
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "keep.txt").write_text("precious")
    calls["n"] = 0
    with pytest.raises(OSError, match="No space left"):
        run(kept, overwrite=True)
    assert [p.name for p in kept.iterdir()] == ["keep.txt"]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]

