"""`hibari convert expand-vocab` fails midway (disk full while writing shards): one line, no partial output."""

from test_expand_vocab import _model_dir, hibari, tokenizers  # noqa: F401  (module fixture reused)


def test_expand_vocab_failure_leaves_no_output(tmp_path, tokenizers, monkeypatch, capsys):  # noqa: F811
    import checkpoints.safetensors_io as st

    root, base, merged, stats = tokenizers
    src = _model_dir(tmp_path, base, "src", stats["base_vocab_size"], tied=False)

    def full_disk(specs, tensors, out_dir, **kw):
        (out_dir / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
        raise OSError(28, "No space left on device", str(out_dir / "model-00002-of-00002.safetensors"))

    monkeypatch.setattr(st, "save_sharded", full_disk)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = hibari(["convert", "expand-vocab", "--hf", str(src), "--tokenizer", str(merged), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model-00002-of-00002.safetensors: No space left on device" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
