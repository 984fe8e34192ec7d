"""`hibari.io.read_jsonl_field` (the `data tokenize` read path) against json.loads per line, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hibari.io as hio  # noqa: E402
from data_pipeline.readers import iter_texts, resolve_inputs  # noqa: E402
from hibari.errors import HibariError  # noqa: E402

# lines the fast path takes ({"text": "..."}) and lines it must hand to json.loads, mixed
LINES = [
    '{"text": "日本語の文。\\n改行"}',
    '{"text": "tab\\t quote \\" back\\\\ \\u3042 \\ud83d\\ude00"}',
    '{"text": "trailing space"}   ',
    '{"text": "extra key", "id": 3}',
    '{"id": 4, "text": "key second"}',
    '{"text": "dup", "text": "last wins"}',
    '{"text": ""}',
    '{"text": null}',
    '{"other": "no text"}',
    '   ',
    '{"text":"no space"}',
    '{"text": "crlf"}\r',
    '{"text": "lone \\ud800 surrogate"}',
    '{ "text" : "spaced" }',
]


def _expected(lines: list[str]) -> list:
    return [json.loads(s).get("text") for s in lines if s.strip()]


@pytest.mark.parametrize("suffix", ["", ".zst"])
def test_field_reader_matches_json_loads_across_block_edges(tmp_path, monkeypatch, suffix):
    lines = LINES * 5
    raw = "\n".join(lines).encode("utf-8")  # no final newline: the last line is a tail
    path = tmp_path / f"a.jsonl{suffix}"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if suffix else raw)
    expected = _expected(lines)
    assert len(expected) == 65
    for size in (1 << 22, 7, 64):  # tiny pieces: lines and UTF-8 characters cut between reads
        monkeypatch.setattr(hio, "_BLOCK", size)
        monkeypatch.setattr(hio, "_READ_CHUNK", size)
        assert list(hio.read_jsonl_field(path, "text")) == expected
        assert [r.get("text") for r in hio.read_jsonl(path)] == expected
        assert list(iter_texts(resolve_inputs(str(path))[0])) == expected
        assert [n for n, _ in hio.iter_lines(path)] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize("bad, message", [
    (b'{"text": "ok"} x', r"a\.jsonl:2: invalid JSON \(Extra data at column 16\)"),
    (b'{"text": "ok"}}', r"a\.jsonl:2: invalid JSON \(Extra data"),
    (b'{"text": "unterminated', r"a\.jsonl:2: invalid JSON \(Unterminated string"),
    (b'{"text": "ctrl \x01 char"}', r"a\.jsonl:2: invalid JSON \(Invalid control character"),
    (b'{"text": "caf\xe9"}', r"a\.jsonl:2: invalid UTF-8 at byte 13"),
    (b'["a list"]', r"a\.jsonl:2: expected a JSON object"),
])
def test_field_reader_errors_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "first"}\n' + bad + b"\n")
    with pytest.raises(HibariError, match=message):
        list(hio.read_jsonl_field(path, "text"))
