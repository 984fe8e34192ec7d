"""checkpoints/safetensors_io.py: direct reads into torch-owned memory and zero-copy writes, against the
`safetensors` package (independent oracle)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import safetensors_io
from checkpoints.safetensors_io import LazySafetensors, write_safetensors_streaming
from hibari.errors import HibariError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(3, 4, 2, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "i64": torch.arange(-5, 6, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_reads_match_safetensors_and_storage_stays_freeable(tmp_path):
    ref = _tensors()
    save_file(ref, str(tmp_path / "m.safetensors"))
    f = LazySafetensors(tmp_path / "m.safetensors")
    for name, expected in ref.items():
        got = f.get(name)
        assert _same(got, expected), name
        got.untyped_storage().resize_(0)  # what the streaming converter does once a tensor is written
    f.close()


def test_short_reads_are_continued(tmp_path, monkeypatch):
    ref = {"w": torch.randn(64, 33)}
    save_file(ref, str(tmp_path / "m.safetensors"))
    real = os.preadv
    calls = []

    def short_preadv(fd, buffers, offset):  # the kernel may return fewer bytes (e.g. reads over 2 GB)
        calls.append(offset)
        return real(fd, [buffers[0][:1000]], offset)

    monkeypatch.setattr(safetensors_io.os, "preadv", short_preadv)
    f = LazySafetensors(tmp_path / "m.safetensors")
    assert torch.equal(f.get("w"), ref["w"]) and len(calls) == -(-64 * 33 * 4 // 1000)
    f.close()


def test_file_cut_after_the_header_check_is_an_error(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "m.safetensors"))
    f = LazySafetensors(tmp_path / "m.safetensors")
    os.truncate(tmp_path / "m.safetensors", (tmp_path / "m.safetensors").stat().st_size - 40)
    with pytest.raises(HibariError, match="truncated while reading tensor 'w'"):
        f.get("w")
    f.close()


def test_streaming_write_loads_identically_with_safetensors(tmp_path):
    ref = _tensors()
    ref["transposed"] = torch.randn(6, 3).t()  # not contiguous: written in logical order
    specs = [(name, tuple(t.shape), t.dtype) for name, t in ref.items()]
    write_safetensors_streaming(tmp_path / "out.safetensors", specs, iter(ref.items()), {"source": "test"})
    back = load_file(str(tmp_path / "out.safetensors"))
    assert set(back) == set(ref)
    assert all(_same(back[n], ref[n].contiguous()) for n in ref)
    assert not list(tmp_path.glob("*.tmp"))
