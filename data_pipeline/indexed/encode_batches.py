"""Batched encoding for `data tokenize`: documents go to the tokenizer and to the .bin file a block at a time.

One SentencePiece batch call (one thread) returning numpy arrays avoids the per-call argument handling and the
Python int lists of a per-document loop (about the CPU of a bare encode loop, bench/results/tokenize.md), and the
block's ids reach the file in one write. A batch the encoder rejects (e.g. a lone surrogate in one document) is
encoded again document by document, so the bad document is a counted skip and the others are kept.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

BATCH_CHARS = 1 << 20  # characters per encoder call: large enough to amortise the call, small for memory
BATCH_DOCS = 4096


def _batches(texts: Iterable[object], stats: dict) -> Iterable[list[str]]:
    """Encodable texts in batches; missing / empty texts are counted here."""
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            stats["skipped_missing_text"] += 1
            continue
        if not text or text.isspace():
            stats["skipped_empty"] += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_each(enc, batch: list[str], stats: dict) -> list[tuple[str, object]]:
    out = []
    for text in batch:
        try:
            out.append((text, enc.encode(text)))
        except (UnicodeError, RuntimeError, TypeError):
            stats["skipped_undecodable"] += 1  # e.g. lone surrogates from a bad \\ud800 escape
    return out


def encode_into(builder, texts: Iterable[object], enc, prefix_ids: list[int], suffix_ids: list[int],
                stats: dict) -> None:
    """Encode `texts` and append one document per text to `builder` (an IndexedDatasetBuilder whose dtype holds
    every id of `enc`); counts documents, characters and skips in `stats`."""
    prefix = np.asarray(prefix_ids, dtype=builder.dtype)
    suffix = np.asarray(suffix_ids, dtype=builder.dtype)
    for batch in _batches(texts, stats):
        encoded = None
        if enc.encode_batch is not None:
            try:
                encoded = list(zip(batch, enc.encode_batch(batch)))
            except (UnicodeError, RuntimeError, TypeError):
                encoded = None  # one bad document: find it, document by document
        if encoded is None:
            encoded = _encode_each(enc, batch, stats)
        docs = [ids for _, ids in encoded]
        if all(map(len, docs)):  # the usual case: no per-document bookkeeping
            stats["documents"] += len(docs)
            stats["characters"] += sum(len(text) for text, _ in encoded)
        else:
            docs = []
            for text, ids in encoded:
                if len(ids) == 0:
                    stats["skipped_empty"] += 1
                    continue
                docs.append(ids)
                stats["documents"] += 1
                stats["characters"] += len(text)
        if docs:
            builder.add_documents(docs, prefix, suffix)
