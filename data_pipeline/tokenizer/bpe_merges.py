"""Continue byte-level BPE training on top of a base segmentation (the algorithm; no file I/O).

Input: the unique pre-tokens of a corpus, each already encoded into BASE token ids by the base BPE model, with their
frequencies. Output: new merges learned greedily (most frequent adjacent pair first, ties broken by the smaller id
pair, so the result is deterministic), exactly like BPE training would have continued from the base vocabulary.

Only pairs in which at least one side contains a non-ASCII byte may merge, so every new token contains a byte
>= 0x80 and a pure-ASCII pre-token can never reach a new merge (the proof is in bpe_expand's docstring).

Counting is incremental: all symbols of all words live in one flat doubly linked list; for every eligible pair we
keep its weighted count and the positions where it starts. A merge visits only the positions of the merged
pair and updates the counts of their neighbouring pairs, so the total work is proportional to the number of symbol
reductions, not to (words x merges). A lazy max-heap picks the next pair.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

_SHIFT = 32  # pair key = (left id << 32) | right id: an int hashes faster than a tuple
_MASK = (1 << _SHIFT) - 1


@dataclass
class MergeResult:
    merges: list[tuple[int, int]] = field(default_factory=list)  # (left id, right id) in learning order
    new_tokens: list[tuple[str, int]] = field(default_factory=list)  # (token string, id) in learning order
    merged_into_existing: int = 0  # merges whose result already was a base token (no new id needed)
    stopped_early: bool = False  # no eligible pair left that occurs min_frequency times
    last_count: int = 0  # weighted count of the last merge learned


def _initial_state(words: list[list[int]], freqs: list[int], non_ascii: set[int]):
    """Flat linked list of all symbols and the counts/positions of every eligible pair (vectorized: this pass touches
    every symbol of the corpus, the merges later touch only the ones they change).

    count[k]: weighted count of pair k (only pairs with a non-ASCII side are tracked). where[k]: positions where pair
    k started at some point, in any order; an entry goes stale when the pair there changes (a position's pair only
    ever grows in bytes, so it can never become k again) and is skipped when k is merged. Nothing is ever removed."""
    import numpy as np

    keep = [i for i, ids in enumerate(words) if len(ids) >= 2 and not non_ascii.isdisjoint(ids)]
    lengths = np.fromiter((len(words[i]) for i in keep), dtype=np.int64, count=len(keep))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(words[i] for i in keep), dtype=np.int64, count=total)
    ends = np.cumsum(lengths) - 1  # last position of each word
    nxt = np.arange(1, total + 1, dtype=np.int64)
    nxt[ends] = -1
    prv = np.arange(-1, total - 1, dtype=np.int64)
    prv[ends[:-1] + 1] = -1
    wfreq = np.repeat(np.fromiter((freqs[i] for i in keep), dtype=np.int64, count=len(keep)), lengths)
    high = np.fromiter(non_ascii, dtype=np.int64, count=len(non_ascii))
    is_high = np.isin(flat, high)
    starts = np.flatnonzero((nxt >= 0) & (is_high | np.roll(is_high, -1)))
    keys = (flat[starts] << _SHIFT) | flat[starts + 1]
    order = np.argsort(keys, kind="stable")  # stable: positions of one pair stay ascending
    keys, starts = keys[order], starts[order]
    uniq, first = np.unique(keys, return_index=True)
    sums = np.add.reduceat(wfreq[starts], first) if len(first) else np.zeros(0, dtype=np.int64)
    count: defaultdict[int, int] = defaultdict(int, zip(uniq.tolist(), sums.tolist()))
    where = dict(zip(uniq.tolist(), (part.tolist() for part in np.split(starts, first[1:]))))
    return flat.tolist(), nxt.tolist(), prv.tolist(), wfreq.tolist(), count, where


def learn_merges(words: list[list[int]], freqs: list[int], id_to_token: dict[int, str], vocab: dict[str, int],
                 non_ascii: set[int], next_id: int, num_new_tokens: int, min_frequency: int = 2,
                 progress=None) -> MergeResult:
    """Learn merges until `num_new_tokens` new token strings exist (or no pair occurs `min_frequency` times).

    `id_to_token`/`vocab`: the base model vocabulary (byte-level strings); they are extended in place with the new
    tokens. `non_ascii`: ids whose token contains a byte >= 0x80 (extended in place). New ids start at `next_id`.
    """
    sym, nxt, prv, wfreq, count, where = _initial_state(words, freqs, non_ascii)
    heap = [(-c, k) for k, c in count.items()]
    heapq.heapify(heap)

    result = MergeResult()
    while len(result.new_tokens) < num_new_tokens:
        if not heap:
            result.stopped_early = True
            break
        neg, key = heapq.heappop(heap)
        c = count.get(key, 0)
        if c <= 0:
            continue
        if c != -neg:  # stale entry (the count went down since it was pushed)
            heapq.heappush(heap, (-c, key))
            continue
        if c < min_frequency:
            result.stopped_early = True
            break
        a, b = key >> _SHIFT, key & _MASK
        text = id_to_token[a] + id_to_token[b]
        new = vocab.get(text)
        if new is None:
            new = next_id
            next_id += 1
            vocab[text] = new
            id_to_token[new] = text
            result.new_tokens.append((text, new))
            if progress is not None:
                progress.advance()
        else:
            result.merged_into_existing += 1
        non_ascii.add(new)
        result.merges.append((a, b))
        result.last_count = c
        del count[key]
        touched: set[int] = set()
        # left to right inside a word, as the HF BPE model applies a merge to overlapping pairs (a a a -> aa a);
        # the drop/add steps are written out inline: this loop is the whole cost of training
        for p in sorted(where.pop(key)):
            if sym[p] != a:
                continue
            q = nxt[p]
            if q < 0 or sym[q] != b:
                continue
            f = wfreq[p]
            left, right = prv[p], nxt[q]
            sym[p] = new
            sym[q] = -1
            nxt[p] = right
            if left >= 0:
                x = sym[left] << _SHIFT
                k = x | a
                if k in count:  # untracked when both sides are ASCII; `key` itself was deleted above
                    count[k] -= f
                k = x | new
                count[k] += f
                positions = where.get(k)
                if positions is None:
                    where[k] = [left]
                else:
                    positions.append(left)
                touched.add(k)
            if right >= 0:
                prv[right] = p
                y = sym[right]
                k = (b << _SHIFT) | y
                if k in count:
                    count[k] -= f
                k = (new << _SHIFT) | y
                count[k] += f
                positions = where.get(k)
                if positions is None:
                    where[k] = [p]
                else:
                    positions.append(p)
                touched.add(k)
        for k in touched:
            c = count[k]
            if c > 0:
                heapq.heappush(heap, (-c, k))
    return result
