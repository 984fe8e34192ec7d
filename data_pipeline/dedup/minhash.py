"""MinHash signatures over character n-grams, vectorized with numpy.

Scheme (pure functions, no per-shingle Python):
  1. text -> Unicode code points (`utf-32-le` view, so a "character" is one code point, as in doubri/Swallow);
  2. every character n-gram -> one 64-bit value (polynomial over the code points, then the splitmix64 finalizer),
     folded to its upper 32 bits with the lowest bit set (x is odd, never 0);
  3. `bands * rows` hash functions h_i(x) = a_i * x mod 2**32 with random odd a_i; the signature is
     min_x h_i(x) over the document's n-grams -> uint32[bands * rows]. Computed in uint32 lanes (8 per AVX2
     instruction), one multiply and one min per n-gram and function: numpy's floor for this work.
     Why no "+ b_i" as in the textbook affine family: the n-gram values are already pseudo-random (splitmix64),
     so each h_i is a uniformly random bijection of the odd numbers, and an offset would not make two functions
     less dependent (h_j = c * h_i + d stays affine either way); it would cost a third pass over the data
     (1.6x slower). The one hazard of a pure multiply, x = 0 mapping to 0 under every function, is removed by
     making x odd. The S-curve and estimator tests check the resulting statistics.
  4. each band's `rows` values -> one 64-bit band key (polynomial + splitmix64), so LSH compares one integer per band.
     Two different band contents share a key with probability 2**-64 per pair: N**2 / 2**65 false collisions
     expected per band over N documents (~0.03 at 1e9 documents), negligible next to MinHash's own error.

Documents shorter than n characters count as one shingle (the whole text); the empty text gets the all-ones
signature, so all empty texts form one cluster (they are exact duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_P = np.uint64(0x100000001B3)  # FNV-64 prime: the polynomial base for n-gram and band keys
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_EMPTY = np.uint32(0xFFFFFFFF)


def _splitmix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer in place on a uint64 array (full avalanche: every input bit affects every output bit)."""
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of all character n-grams of every text, concatenated; plus the n-gram count per text."""
    if n < 1:
        raise ValueError("n must be >= 1")
    cps = [np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) for t in texts]
    lens = np.fromiter((len(c) for c in cps), dtype=np.int64, count=len(cps))
    if lens.sum() == 0:
        return np.zeros(0, np.uint32), np.zeros(len(texts), np.int64)
    # texts shorter than n: one shingle = the whole text (padded with zeros, which no code point of real text is)
    short = (lens > 0) & (lens < n)
    if short.any():
        cps = [np.concatenate([c, np.zeros(n - len(c), np.uint32)]) if 0 < len(c) < n else c for c in cps]
        lens = np.where(short, n, lens)
    allc = np.concatenate(cps).astype(np.uint64)
    total = len(allc) - n + 1
    h = np.zeros(max(total, 0), np.uint64)
    for k in range(n):
        h *= _P
        h += allc[k:k + total]
    _splitmix64(h)
    counts = np.maximum(lens - n + 1, 0)
    ends = np.cumsum(lens)
    starts = ends - lens
    # keep the windows that start inside a text and end inside the same text
    valid = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)]) if counts.sum() else \
        np.zeros(0, np.int64)
    return (h[valid] >> np.uint64(32)).astype(np.uint32) | np.uint32(1), counts


def permutation_params(num_perm: int, seed: int) -> np.ndarray:
    """Random odd multipliers of the `num_perm` 32-bit multiplicative hash functions."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)


def minhash_from_hashes(hashes: np.ndarray, counts: np.ndarray, a: np.ndarray, block_rows: int = 256) -> np.ndarray:
    """Signatures (len(counts), len(a)) uint32 from concatenated shingle hashes and per-document counts.

    Works in blocks of `block_rows` shingles so the (rows x num_perm) scratch stays in cache.
    """
    num_docs, num_perm = len(counts), len(a)
    out = np.full((num_docs, num_perm), _EMPTY, dtype=np.uint32)
    buf = np.empty((block_rows, num_perm), dtype=np.uint32)
    a_row = a[None, :]
    pos = 0
    for d in range(num_docs):
        c = int(counts[d])
        row = out[d]
        for s in range(pos, pos + c, block_rows):
            e = min(s + block_rows, pos + c)
            blk = buf[: e - s]
            np.multiply(hashes[s:e, None], a_row, out=blk)
            np.minimum(row, blk.min(axis=0), out=row)
        pos += c
    return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, num_docs) uint64: one key per band, equal iff (up to 2**-64) the band's `rows` values are equal."""
    num_docs = signatures.shape[0]
    if signatures.shape[1] != bands * rows:
        raise ValueError(f"signature width {signatures.shape[1]} != bands*rows {bands * rows}")
    sig = signatures.reshape(num_docs, bands, rows).astype(np.uint64)
    keys = np.full((num_docs, bands), np.uint64(bands), dtype=np.uint64)  # seed differs from 0 only cosmetically
    for r in range(rows):
        keys *= _P
        keys += sig[:, :, r]
    _splitmix64(keys)
    return np.ascontiguousarray(keys.T)


@dataclass(frozen=True)
class MinHasher:
    """Character n-gram MinHash with `bands * rows` hash functions (Swallow: 5-grams, 40 x 20)."""

    ngram: int = 5
    bands: int = 40
    rows: int = 20
    seed: int = 1

    def __post_init__(self):
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError("ngram, bands and rows must be >= 1")
        object.__setattr__(self, "_a", permutation_params(self.bands * self.rows, self.seed))

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def signatures(self, texts: list[str]) -> np.ndarray:
        hashes, counts = ngram_hashes(texts, self.ngram)
        return minhash_from_hashes(hashes, counts, self._a)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        return band_keys(signatures, self.bands, self.rows)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity of two documents' n-gram sets."""
    return float(np.mean(sig_a == sig_b))


def char_ngram_jaccard(text_a: str, text_b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of the character n-gram sets (reference for tests and benchmarks)."""
    def grams(t: str) -> set[str]:
        return {t[i:i + n] for i in range(max(len(t) - n + 1, 1 if t else 0))}
    ga, gb = grams(text_a), grams(text_b)
    if not ga and not gb:
        return 1.0
    return len(ga & gb) / len(ga | gb)


def detection_probability(s: float | np.ndarray, bands: int, rows: int):
    """Probability that a pair of Jaccard `s` shares at least one band: 1 - (1 - s**rows)**bands (the S-curve)."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands
