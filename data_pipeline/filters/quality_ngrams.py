"""Character n-gram statistics of the Swallow quality features: top_{2,3,4}gram_character_fraction and
duplicate_{5..10}gram_character_fraction, exact and vectorized (one document, or a batch from one buffer).

Speed: the character n-gram statistics for n = 2..10 come from ONE ordering of the text's positions by their
10-character prefix (an integer sort on the first 4 characters packed in a uint64, then only the tied positions
re-sorted by the next 6) plus the common prefix of sorted neighbours (capped at 10): equal n-grams are contiguous
in that order, and neighbours belong to the same n-gram iff their first n characters agree. Positions whose suffix
is shorter than n never join (their zero-padded windows differ), so no n-gram crosses the end of the text. Exact:
no hashing.
"""

from __future__ import annotations

import numpy as np

NGRAM_TOP_RANGE = (2, 3, 4)
NGRAM_DUP_RANGE = (5, 6, 7, 8, 9, 10)
_MAX_N = 10
_TOP_KEY = {n: f"top_{n}gram_character_fraction" for n in NGRAM_TOP_RANGE}
_DUP_KEY = {n: f"duplicate_{n}gram_character_fraction" for n in NGRAM_DUP_RANGE}

_ZERO_NGRAM_STATISTICS = {**{_TOP_KEY[n]: 0.0 for n in NGRAM_TOP_RANGE}, **{_DUP_KEY[n]: 0.0 for n in NGRAM_DUP_RANGE}}


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


_U64 = np.uint64
_BELOW = (_U64(1 << 48), _U64(1 << 32), _U64(1 << 16))


def _joined_neighbours(cp: np.ndarray) -> np.ndarray:
    """joined[n-1, j]: positions j and j+1 of the text, sorted by their 10-character prefix (padded past the end
    with 0, which sorts before every character), share their first n characters. Shape (10, len(cp) - 1)."""
    n = len(cp)
    if int(cp.max()) < 0xFFFF:
        values = cp + 1
    else:
        uniq, inverse = np.unique(cp, return_inverse=True)  # dense ranks keep the order
        if len(uniq) >= 0xFFFF:
            return _joined_neighbours_wide(inverse + 1)
        values = inverse + 1
    # characters as big-endian uint16, so 4 consecutive ones read as one uint64 compare like the 4-gram
    pad = np.zeros(n + _MAX_N + 2, dtype=">u2")
    pad[:n] = values
    k1 = np.ndarray(shape=(n,), dtype=">u8", buffer=pad, strides=(2,)).astype(np.uint64)  # chars 0-3
    k2 = np.ndarray(shape=(n,), dtype=">u8", buffer=pad, offset=8, strides=(2,)).astype(np.uint64)  # 4-7
    k3 = np.ndarray(shape=(n,), dtype=">u4", buffer=pad, offset=16, strides=(2,)).astype(np.uint32)  # 8-9
    return _joined_from_keys(k1, k2, k3)


def _prefix_order(k1: np.ndarray, k2: np.ndarray, k3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ordered by their 10-character prefix, and their sorted characters 0-3: one integer sort on
    characters 0-3, then only the positions sharing a 4-gram re-sorted by characters 4-9."""
    order = np.argsort(k1)
    s1 = k1[order]
    tie = s1[1:] == s1[:-1]
    if tie.any():
        in_tie = np.zeros(len(k1), dtype=bool)
        in_tie[1:] = tie
        in_tie[:-1] |= tie
        sub = order[in_tie]
        order[in_tie] = sub[np.lexsort((k3[sub], k2[sub], s1[in_tie]))]
    return order, s1


def _joined_from_keys(k1: np.ndarray, k2: np.ndarray, k3: np.ndarray) -> np.ndarray:
    """`_joined_neighbours` from each position's characters 0-3 / 4-7 (uint64) and 8-9 (uint32), 16 bits each."""
    order, s1 = _prefix_order(k1, k2, k3)
    joined = np.empty((_MAX_N, len(k1) - 1), dtype=bool)
    _fill_joined(joined, s1, k2[order], k3[order])
    return joined


def _fill_joined(out: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray) -> None:
    """out[r, j] = sorted positions j and j+1 share their first r+1 characters, from the sorted characters 0-3,
    4-7 and 8-9 (`out` has one column fewer than the keys)."""
    x1 = s1[1:] ^ s1[:-1]
    x2 = s2[1:] ^ s2[:-1]
    x3 = s3[1:] ^ s3[:-1]
    for row, x in ((0, x1), (4, x2)):
        for i, bound in enumerate(_BELOW):  # common prefix >= 1, 2, 3 characters of this 4-character word
            np.less(x, bound, out=out[row + i])
        np.equal(x, 0, out=out[row + 3])
    np.less(x3, 1 << 16, out=out[8])
    np.equal(x3, 0, out=out[9])
    out[4:8] &= out[3]
    out[8:] &= out[7]


def _joined_neighbours_wide(values: np.ndarray) -> np.ndarray:
    """Same for texts with >= 65535 distinct characters: sort the 10-character windows as byte strings."""
    n = len(values)
    pad = np.zeros(n + _MAX_N, dtype=">u4")
    pad[:n] = values
    windows = np.ndarray(shape=(n, _MAX_N), dtype=">u4", buffer=pad, strides=(4, 4))
    keys = np.ascontiguousarray(windows).view(f"S{4 * _MAX_N}").ravel()
    columns = np.sort(keys).view("u4").reshape(n, _MAX_N).T
    joined = np.empty((_MAX_N, n - 1), dtype=bool)
    np.equal(columns[:, 1:], columns[:, :-1], out=joined)
    np.logical_and.accumulate(joined, axis=0, out=joined)
    return joined


def ngram_statistics(text: str, cp: np.ndarray | None = None) -> dict[str, float]:
    """top_{2,3,4}gram_character_fraction and duplicate_{5..10}gram_character_fraction of `text`."""
    out: dict[str, float] = {}
    n_chars = len(text)
    if n_chars < 2:
        for n in NGRAM_TOP_RANGE:
            out[_TOP_KEY[n]] = 0.0
        for n in NGRAM_DUP_RANGE:
            out[_DUP_KEY[n]] = 0.0
        return out
    return _ngram_statistics_from_joined(n_chars, _joined_neighbours(_code_points(text) if cp is None else cp))


def _ngram_statistics_from_joined(n_chars: int, joined: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    # equal n-grams are contiguous in sorted order, so groups of >= 2 equal n-grams = runs of joined neighbours
    num_joined = joined.sum(axis=1, dtype=np.int32)  # (sum with an int dtype is ~2x faster than count_nonzero)
    num_groups = (joined[:, 1:] > joined[:, :-1]).sum(axis=1, dtype=np.int32) + joined[:, 0]  # run starts
    for n in NGRAM_TOP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[_TOP_KEY[n]] = 0.0
            continue
        # longest run of joined neighbours, plus one = size of the largest group of equal n-grams
        if not num_joined[n - 1]:
            run = 0
        else:
            breaks = np.flatnonzero(~joined[n - 1])
            if not len(breaks):
                run = n_chars - 1
            else:
                run = max(int(breaks[0]), n_chars - 2 - int(breaks[-1]),
                          int((breaks[1:] - breaks[:-1]).max()) - 1 if len(breaks) > 1 else 0)
        out[_TOP_KEY[n]] = (run + 1) / total
    for n in NGRAM_DUP_RANGE:
        total = n_chars - n + 1
        if total <= 0:
            out[_DUP_KEY[n]] = 0.0
            continue
        out[_DUP_KEY[n]] = int(num_groups[n - 1]) / (total - int(num_joined[n - 1]))
    return out


def _distinct_uint16(cp: np.ndarray) -> np.ndarray | None:
    """Characters as distinct values 1..0xFFFF (0 is padding): code point + 1 below U+FFFF, the rest take values
    that no character of this batch uses (n-gram statistics only depend on which characters are equal). None when
    the batch has too many distinct characters."""
    if not len(cp):
        return None
    values = cp + 1
    high = cp >= 0xFFFF
    if not high.any():
        return values
    used = np.zeros(0x10000, dtype=bool)
    used[values[~high]] = True
    big, inverse = np.unique(cp[high], return_inverse=True)
    free = np.flatnonzero(~used[1:])[:len(big)] + 1
    if len(free) < len(big):
        return None
    values[high] = free[inverse]
    return values


def _ngram_statistics_keys_batch(k1, k2, k3, lens: list[int], gap: int) -> list[dict[str, float]]:
    """`ngram_statistics` of each document of a batch from the sort keys of `_joined_neighbours` (documents `gap`
    positions apart). Only the sort runs per document (sorting ~1,000 cache-resident keys per document beats one
    sort of the batch); the neighbour comparisons and counts run once on the concatenated sorted orders, with
    pairs across two documents masked and per-document segment reductions."""
    pieces = []
    start = 0
    for length in lens:
        if length >= 2:
            end = start + length
            order, _ = _prefix_order(k1[start:end], k2[start:end], k3[start:end])
            order += start
            pieces.append(order)
        start += length + gap
    out = []
    if pieces:
        order = np.concatenate(pieces)
        seg_lens = np.array([n for n in lens if n >= 2], dtype=np.int64)
        seg_start = np.zeros(len(seg_lens), dtype=np.int64)
        np.cumsum(seg_lens[:-1], out=seg_start[1:])
        total_n = int(seg_lens.sum())
        # joined[r, j]: sorted positions j, j+1 of one document share their first r+1 characters; a document's
        # last column pairs it with the next document and is False
        joined = np.empty((_MAX_N, total_n), dtype=bool)
        _fill_joined(joined[:, :-1], k1[order], k2[order], k3[order])
        joined[:, seg_start + seg_lens - 1] = False
        num_joined = np.add.reduceat(joined, seg_start, axis=1, dtype=np.int32)
        run_start = np.empty_like(joined)
        run_start[:, 0] = joined[:, 0]
        np.greater(joined[:, 1:], joined[:, :-1], out=run_start[:, 1:])
        num_groups = np.add.reduceat(run_start, seg_start, axis=1, dtype=np.int32)
        longest = []
        for n in NGRAM_TOP_RANGE:  # longest run of joined neighbours per document (each ends with a break)
            breaks = np.flatnonzero(~joined[n - 1])
            gaps = np.diff(breaks, prepend=-1) - 1
            longest.append(np.maximum.reduceat(gaps, np.searchsorted(breaks, seg_start)).tolist())
        num_joined = num_joined.tolist()
        num_groups = num_groups.tolist()
    k = 0
    for n_chars in lens:
        if n_chars < 2:
            out.append(dict(_ZERO_NGRAM_STATISTICS))
            continue
        f: dict[str, float] = {}
        for i, n in enumerate(NGRAM_TOP_RANGE):
            total = n_chars - n + 1
            f[_TOP_KEY[n]] = (longest[i][k] + 1) / total if total > 0 else 0.0
        for n in NGRAM_DUP_RANGE:
            total = n_chars - n + 1
            f[_DUP_KEY[n]] = num_groups[n - 1][k] / (total - num_joined[n - 1][k]) if total > 0 else 0.0
        out.append(f)
        k += 1
    return out
